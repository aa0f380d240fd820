"""The settings' defaults, registered with Hydra's ConfigStore from the dataclasses that define them, so that
conf/*.yaml hold only what differs and a key no dataclass has is an error when Hydra composes.

    settings/train              train.loop.TrainArgs (+ mixed_precision, the Accelerator's)
    settings/optim              train.loop.OptimArgs
    settings/filter/<name>      the filter policy's dataclass (filtering.policies.POLICIES), with its name
    settings/mitigation         train.mitigation.MitigationArgs (the training-time baselines)
    settings/sweep              launch.sweep.SweepArgs (how each job of a multirun runs)
    settings/world_evaluation   toyworld.evaluate.WorldEvalSettings (launch/evaluate.py toy_world=true)
    settings/model/tiny         train.families.sd.build_tiny's arguments (the tiny model built from config)
    settings/curate             the curation pass's score.* (filtering.curate.ScoreArgs) and decide.*
                                (filtering.curation.DecideArgs)
    settings/data/<name>        the data source's constructor (webdataset, hf, imagefolder) and, for map-style
                                sources, the duplication plan's (train.data.duplication.make_plan)

Every app calls `register()` before Hydra composes (launch/train.py, the demo, tests' compose).
"""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from memfilter.filtering.policies import POLICIES
from memfilter.filtering.settings import defaults, signature_defaults

# keys a policy takes from the loop, not from the config
FROM_LOOP = ("num_train_timesteps",)
# the train config's keys that are not TrainArgs fields: config groups, and what configures the Accelerator
GROUPS = ("model", "data", "filter", "optim", "logger", "mitigation", "sweep")
APP_KEYS = {"mixed_precision": None}
_done = False


def train_node() -> dict:
    from memfilter.train.loop import TrainArgs

    return {**defaults(TrainArgs, exclude=("lora_rank",)), **APP_KEYS}


def register() -> None:
    global _done
    if _done:
        return
    from memfilter.train.loop import OptimArgs

    cs = ConfigStore.instance()
    cs.store(group="settings", name="train", node=train_node())
    cs.store(group="settings", name="optim", node=defaults(OptimArgs))
    from memfilter.train.mitigation import MitigationArgs
    cs.store(group="settings", name="mitigation", node=defaults(MitigationArgs))
    from memfilter.launch.sweep import SweepArgs
    cs.store(group="settings", name="sweep", node=defaults(SweepArgs))
    from memfilter.toyworld.evaluate import WorldEvalSettings
    cs.store(group="settings", name="world_evaluation", node=defaults(WorldEvalSettings, exclude=("seed",)))
    for name, cls in POLICIES.items():
        cs.store(group="settings/filter", name=name, node={"name": name, **defaults(cls, exclude=FROM_LOOP)})
    from memfilter.train.families import build_tiny
    cs.store(group="settings/model", name="tiny",
             node={"family": "sd", **signature_defaults(build_tiny, exclude=("prediction_type", "words"))})
    for name, node in data_nodes().items():
        cs.store(group="settings/data", name=name, node=node)
    from memfilter.filtering.curate import ScoreArgs
    from memfilter.filtering.curation import DecideArgs
    cs.store(group="settings", name="curate", node={"score": defaults(ScoreArgs), "decide": defaults(DecideArgs)})
    _done = True


def data_nodes() -> dict[str, dict]:
    """Each data source's keys and defaults, from its constructor: what the loop passes itself is left out."""
    from memfilter.train.data.duplication import make_plan
    from memfilter.train.data.hf import HFSource
    from memfilter.train.data.imagefolder import ImageFolderSource
    from memfilter.train.data.wds import WebDatasetSource

    duplication = {"protocol": None, **signature_defaults(make_plan, exclude=("num_items", "num_captions")),
                   "caption_file": None}
    runtime = ("urls", "collate", "rank", "world_size", "batch_size", "seed", "config_prefix", "dataset", "path")
    return {
        "webdataset": {"name": "webdataset", "shards": "???", **signature_defaults(WebDatasetSource.__init__, runtime)},
        "hf": {"name": "hf", "path": "???", **signature_defaults(HFSource.__init__, runtime), "seed": "${seed}",
               "duplication": duplication, "keep_list": None},
        "imagefolder": {"name": "imagefolder", "path": "???",
                        **signature_defaults(ImageFolderSource.__init__, runtime), "seed": "${seed}",
                        "duplication": duplication, "keep_list": None},
    }
