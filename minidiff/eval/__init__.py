"""Evaluation: the shipped classifiers (the feature space of classifier-FID), metrics, and sample-then-score."""
from minidiff.eval.classifiers import load_classifier
from minidiff.eval.evaluation import evaluate, generate
from minidiff.eval.metrics import class_accuracy, frechet_distance, kid, precision_recall, prompt_adherence

__all__ = ["load_classifier", "evaluate", "generate", "class_accuracy", "frechet_distance", "kid",
           "precision_recall", "prompt_adherence"]
