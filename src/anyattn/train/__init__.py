"""`anyattn train`: small models with any mixer trained on synthetic recall tasks and byte-level
language modelling, to measure quality beside speed."""
from .corpus import Corpus, file_corpus, lm_batch, ngram_bits_per_byte, stdlib_corpus
from .tasks import RecallBatch, mqar, mqar_gap_probs, selective_copy, split_seed
from .loop import build_model, evaluate, run, train
from .mixers import LayerSpec, build_mixer, build_pattern, parse_mixers, state_size
from .model import BlockModel, RecallModel
from .presets import Preset, RunConfig, preset
from .report import best_runs, plot, table, write_json
