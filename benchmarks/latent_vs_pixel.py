"""Latent vs pixel diffusion on the same 64x64 images: training speed, and the quality each reaches in the same time.

Both models are the "tiny" U-Net (same widths, depth, attention, class embedding for the 30 (colour, shape)
classes), trained with the same recipe as shapes64-latent (v-prediction, cosine schedule, AdamW lr 1e-3 with 100 warmup steps,
batch 64, EMA 0.999, 10% label dropout) for the same wall-clock budget. Neither clips x0_hat, so both
sample the same way (trailing spacing, whose first step at t = T - 1 eps-prediction cannot take without clipping):

* pixel: on the one-object 64x64x3 shapes images;
* latent: on the shipped autoencoder's scaled 16x16x4 latents of the same images (encoded once; the encoding time
  is printed separately: it is paid once per dataset, not per step).

Then each draws the same number of class-balanced samples (DPM-Solver++ 2M, 20 steps, guidance 2; the latent ones
decoded) and the shipped shapes classifier scores them: FID against held-out one-object images (with the
real-vs-real floor) and class accuracy (colour and shape read back correctly). Prints the measured img/s of both,
their ratio, and the quality table.

Run: OMP_NUM_THREADS=2 nice python benchmarks/latent_vs_pixel.py --seconds 300 --n-eval 300
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from minidiff.data.shapes import ShapesDataset, make_shapes
from minidiff.denoiser import Denoiser
from minidiff.eval.autoencoder import to_classifier_size
from minidiff.eval.classifiers import extract_features, load_classifier
from minidiff.eval.evaluation import generate
from minidiff.eval.metrics import frechet_distance_from_features
from minidiff.models.unet import unet_from_preset
from minidiff.pretrained import load
from minidiff.schedules import alphas_cumprod_from_betas, make_betas
from minidiff.training.latent import CLASS_NAMES, labels_of
from minidiff.training.steps import EMA, make_optimizer, train_step


def train_for(x0: torch.Tensor, labels: torch.Tensor, seconds: float, *, batch_size: int = 64, seed: int = 0):
    """Train a tiny class-conditional U-Net on x0 (N, C, H, W) for ``seconds``; returns (EMA net, steps, img/s)."""
    torch.manual_seed(seed)
    net = unet_from_preset("tiny", in_channels=x0.shape[1], out_channels=x0.shape[1], num_classes=len(CLASS_NAMES))
    ema = EMA(net, 0.999)
    optimizer, scheduler = make_optimizer(net, lr=1e-3, warmup_steps=100)
    alphas_cumprod = alphas_cumprod_from_betas(make_betas("cosine", 1000))
    data_gen, noise_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        idx = torch.randint(len(x0), (batch_size,), generator=data_gen)
        train_step(net, x0[idx], alphas_cumprod=alphas_cumprod, prediction="v", optimizer=optimizer,
                   scheduler=scheduler, class_labels=labels[idx], p_uncond=0.1, null_id=len(CLASS_NAMES),
                   generator=noise_gen)
        ema.update(net)
        steps += 1
    elapsed = time.perf_counter() - start
    net_ema = ema.copy_to(copy.deepcopy(net)).eval()
    return Denoiser(net_ema, alphas_cumprod, "v", image_shape=tuple(x0.shape[1:])), steps, steps * batch_size / elapsed


def score(denoiser, n: int, decode=None) -> dict:
    """Classifier FID and class accuracy of ``n`` class-balanced samples (decoded with ``decode`` if given)."""
    classifier = load_classifier("shapes")
    gen = generate(denoiser, n=n, shape=tuple(denoiser.image_shape), steps=20, guidance=2.0,
                   generator=torch.Generator().manual_seed(0), progress=False, decode=decode)
    fake = to_classifier_size(gen.images)
    real = to_classifier_size(make_shapes(n, size=64, seed=3, max_objects=1)[0])
    logits = classifier.logits(fake)
    pred = logits["color1"].argmax(1) * 5 + logits["shape1"].argmax(1)
    return {"fid": frechet_distance_from_features(extract_features(classifier, real), extract_features(classifier, fake)),
            "class_accuracy": float((pred == gen.labels).double().mean()), "sampling_s": gen.wall_time_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=300, help="training wall-clock budget of each model")
    p.add_argument("--n-train", type=int, default=5000, help="one-object 64x64 training images")
    p.add_argument("--n-eval", type=int, default=300, help="samples scored per model")
    args = p.parse_args()
    vae = load("shapes64-vae")
    shapes = ShapesDataset(args.n_train, size=64, seed=2, max_objects=1)
    images = shapes.tensors()[0]
    labels = labels_of(torch.stack([shapes.layout(i)[0] for i in range(args.n_train)]))
    t0 = time.perf_counter()
    with torch.no_grad():
        latents = torch.cat([vae.encode_latents(images[k:k + 250]) for k in range(0, len(images), 250)])
    encode_s = time.perf_counter() - t0
    print(f"threads {torch.get_num_threads()}; encoding {args.n_train} images once: {encode_s:.1f} s "
          f"({args.n_train / encode_s:.0f} img/s)")
    results = {}
    for name, x0, decode in (("latent", latents, vae.decode_latents), ("pixel", images, None)):
        denoiser, steps, rate = train_for(x0, labels, args.seconds)
        results[name] = {"steps": steps, "img_s": rate, **score(denoiser, args.n_eval, decode)}
        print(f"{name:>6}: {steps} steps in {args.seconds:.0f} s, {rate:.1f} img/s; FID {results[name]['fid']:.2f}, "
              f"class accuracy {results[name]['class_accuracy']:.3f}, sampling {results[name]['sampling_s']:.0f} s",
              flush=True)
    floor = frechet_distance_from_features(
        extract_features(load_classifier("shapes"), to_classifier_size(make_shapes(args.n_eval, size=64, seed=3,
                                                                                   max_objects=1)[0])),
        extract_features(load_classifier("shapes"), to_classifier_size(images[:args.n_eval])))
    ratio = results["latent"]["img_s"] / results["pixel"]["img_s"]
    print(f"\ntraining throughput ratio latent / pixel: {ratio:.1f}x  (goal >= 8x)")
    print(f"same {args.seconds:.0f} s of training, {args.n_eval} samples each (real-vs-real FID floor {floor:.2f}):")
    print(f"{'':>8} {'steps':>6} {'img/s':>7} {'FID':>7} {'class acc':>9}")
    for name, r in results.items():
        print(f"{name:>8} {r['steps']:>6} {r['img_s']:>7.1f} {r['fid']:>7.2f} {r['class_accuracy']:>9.3f}")


if __name__ == "__main__":
    main()
