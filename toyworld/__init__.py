"""The toy world, the embedded default: a procedurally drawn captioned image set in which memorization is read
exactly from pixels, its base model and its evaluation.

    toyworld.world      the data: items, the fine-tuning set (ToyWorld), readers, descriptors, prep to shards
    toyworld.base       the base model builder (the shipped weights: toyworld/assets/world-base)
    toyworld.evaluate   detection, replication and fidelity of a pipeline in the world
    toyworld.report     the demo's report (Markdown, JSON, plots)

Its settings live once, in conf/world/default.yaml (the `world` config group). It is used by `train` and
`evaluation` like any other data source and evaluator: it imports them, they never import it.
"""
