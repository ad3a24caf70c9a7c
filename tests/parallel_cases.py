"""What the CPU multi-process tests run, on every rank (tests/parallel_worker.py) and once in the
test process over the whole model (the reference): the same prompts, chunking and steps."""
from __future__ import annotations

from model.config import ModelConfig
from tests.hf_reference import ours_greedy

PROMPTS = [[5, 17, 42, 99, 3, 250, 8], [200, 1, 77]]   # two rows of different lengths
CHUNK = 4               # prefill chunk: the first prompt runs as two chunks
STEPS = 3               # greedy decode steps after the prefill
SEED = 3                # random weights
NEW_TOKENS = 6          # Generator runs
SAMPLED = dict(temperature=0.9, top_k=20, top_p=0.95, seed=7)


def tiny() -> ModelConfig:
    return ModelConfig.preset("tiny")


def greedy(decoder, prompts=PROMPTS, steps=STEPS):
    """(per row: [V] logits of the prompt's last token then of each step, per row: tokens)."""
    decoder.prefill_step(CHUNK)
    logits, tokens = ours_greedy(decoder, prompts, steps)
    return [[t.float() for t in row] for row in logits], tokens


def generate(decoder):
    """(greedy tokens, sampled tokens) of the Generator (eager) from PROMPTS[0]."""
    from model.generation import Generator, SamplingParams

    out = []
    for sp in (SamplingParams(), SamplingParams(**SAMPLED)):
        with Generator(decoder, sp, use_graph=False, prefill_chunk=CHUNK) as gen:
            out.append(gen.generate([PROMPTS[0]], NEW_TOKENS).tokens[0])
    return tuple(out)


def max_diff(a, b) -> float:
    """Largest |a - b| over two per-row lists of logits."""
    return max(float((x - y).abs().max()) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
