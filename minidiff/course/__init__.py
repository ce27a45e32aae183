"""The course's own tools: plots, interactive explorers, assignment building, checks and grading."""
