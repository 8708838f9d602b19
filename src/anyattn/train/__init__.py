"""`anyattn train`: small models with any mixer trained on synthetic recall tasks and byte-level
language modelling, to measure quality beside speed."""
# harness (mixers, models, loop, presets, report)
from .loop import build_model, evaluate, run, train
from .mixers import LayerSpec, build_mixer, build_pattern, parse_mixers, state_size
from .model import BlockModel, RecallModel
from .presets import Preset, RunConfig, preset
from .report import best_runs, plot, table, write_json
