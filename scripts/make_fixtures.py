#!/usr/bin/env python3
"""Hugging Face reference fixtures for `llama2 check`, in the format of assets/fixtures/README.md.

Runs transformers' LlamaForCausalLM (float32, eager attention) on a seeded random model of a given
config (or on a checkpoint's own weights) and dumps weights, a language-model case (logits, loss,
every gradient), a reward-model case and an AdamW case, so the engine can be checked against
Hugging Face at any model's shapes.

Made with torch 2.15.0 and transformers 5.23.0 (the versions of ../shared's fixtures); other
versions should agree to float rounding. Setup, once (torch from PyPI, or PyTorch's CPU-only build):

    python3 -m venv target/fixtures-venv
    target/fixtures-venv/bin/pip install torch==2.15.0 transformers==5.23.0

Examples:

    P=target/fixtures-venv/bin/python
    $P scripts/make_fixtures.py --preset llama-tiny-gqa --preset llama-tiny-mha --out assets/fixtures
    $P scripts/make_fixtures.py --config my-config.json --out runs/fx/mine      # your shapes
    $P scripts/make_fixtures.py --model path/to/hf-checkpoint --out runs/fx/ckpt  # your weights
    target/release/llama2 check runs/fx/mine
"""

import argparse
import json
import sys
from pathlib import Path

# The two configs the tests use: grouped-query (6 query heads over 2 KV heads) and plain
# multi-head attention, small enough that all four files stay under 1.5 MB.
PRESETS = {
    "llama-tiny-gqa": dict(vocab_size=512, hidden_size=96, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2),
    "llama-tiny-mha": dict(vocab_size=384, hidden_size=64, intermediate_size=176,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
}
COMMON = dict(rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
              tie_word_embeddings=False, hidden_act="silu")
# Keys written to config.json (the fixture format's), plus head_dim when it is not hidden/heads.
CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
               "max_position_embeddings", "tie_word_embeddings", "hidden_act"]
# Reward-model margins cycle through the paper's small-margin levels (significantly better ..
# slightly better).
MARGINS = [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Each fixture directory gets a README.md with the versions, "
                                       "seed and command that made it.")
    src = p.add_argument_group("model (one of)")
    src.add_argument("--preset", action="append", choices=sorted(PRESETS), default=[],
                     help="a built-in config; repeat for several (each in OUT/NAME)")
    src.add_argument("--config", type=Path, help="an HF LlamaConfig JSON; random weights")
    src.add_argument("--model", type=Path,
                     help="an HF Llama checkpoint directory; its own weights, in float32")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory (the parent of each preset's directory)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and inputs (default 0)")
    p.add_argument("--batch", type=int, default=2, help="LM case rows (default 2)")
    p.add_argument("--seq-len", type=int, default=33, help="tokens per row (default 33)")
    p.add_argument("--masked", type=int, default=11,
                   help="leading label positions set to -100 in every row (default 11)")
    p.add_argument("--rm-pairs", type=int, default=3, help="reward-model pairs (default 3)")
    p.add_argument("--init-std", type=float, default=0.08,
                   help="std of random weight matrices (default 0.08: logits of a few units, "
                        "so errors in any layer show)")
    a = p.parse_args(argv)
    if sum([bool(a.preset), a.config is not None, a.model is not None]) != 1:
        p.error("give exactly one of --preset (repeatable), --config, --model")
    if not 0 <= a.masked < a.seq_len - 1:
        p.error("--masked must leave at least two labelled positions")
    if min(a.batch, a.rm_pairs, a.seq_len) < 1:
        p.error("--batch, --rm-pairs and --seq-len must be positive")
    return a


def rope(cfg):
    """(rope_type, rope_theta) under transformers 5 (`rope_parameters`) and 4 (`rope_theta`)."""
    rp = getattr(cfg, "rope_parameters", None) or {}
    return rp.get("rope_type", "default"), rp.get("rope_theta", getattr(cfg, "rope_theta", None))


def check_supported(cfg):
    """The engine's Llama: plain RoPE, no biases, SiLU. Anything else would fail the check for
    reasons that are not bugs."""
    bad = [f"rope_type {rope(cfg)[0]}" if rope(cfg)[0] != "default" else None,
           "attention_bias" if getattr(cfg, "attention_bias", False) else None,
           "mlp_bias" if getattr(cfg, "mlp_bias", False) else None,
           f"hidden_act {cfg.hidden_act}" if cfg.hidden_act != "silu" else None]
    bad = [b for b in bad if b]
    if bad:
        sys.exit(f"unsupported by the engine's Llama: {', '.join(bad)}")


def config_dict(cfg):
    d = {k: (rope(cfg)[1] if k == "rope_theta" else getattr(cfg, k)) for k in CONFIG_KEYS}
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim and head_dim != cfg.hidden_size // cfg.num_attention_heads:
        d["head_dim"] = head_dim
    d["architectures"] = ["LlamaForCausalLM"]
    d["model_type"] = "llama"
    return d


def randomize(model, gen, init_std):
    """Seeded weights, independent of transformers' own init: matrices N(0, init_std²) and norm
    gains 1 + N(0, 0.1²) (gains of exactly 1 would hide a gain applied in the wrong place)."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(init_std * torch.randn(p.shape, generator=gen))


def grads(named_params, prefix=""):
    return {f"grad.{prefix}{n}": p.grad.detach().clone().contiguous()
            for n, p in named_params}


def lm_case(model, cfg, gen, a):
    import torch
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_len), generator=gen)
    labels = ids.clone()
    labels[:, :a.masked] = -100
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    t = {"input_ids": ids, "labels": labels, "logits": out.logits.detach().float().contiguous(),
         "loss": out.loss.detach().reshape(())}
    t.update(grads(model.named_parameters()))
    return t


def rm_case(model, cfg, gen, a, init_std):
    """reward(x) = score.weight · h_final[len-1]; loss = mean(-log σ(r_c - r_r - margin))."""
    import torch
    n, t = a.rm_pairs, a.seq_len
    base = model.model
    score = torch.nn.Parameter(init_std * torch.randn(1, cfg.hidden_size, generator=gen))
    chosen = torch.randint(0, cfg.vocab_size, (n, t), generator=gen)
    rejected = torch.randint(0, cfg.vocab_size, (n, t), generator=gen)
    lo = max(1, t // 2)
    chosen_len = torch.randint(lo, t + 1, (n,), generator=gen)
    rejected_len = torch.randint(lo, t + 1, (n,), generator=gen)
    margin = torch.tensor([MARGINS[i % len(MARGINS)] for i in range(n)], dtype=torch.float32)
    model.zero_grad(set_to_none=True)

    def reward(ids, lens):
        h = base(input_ids=ids).last_hidden_state  # after model.norm
        return (h[torch.arange(n), lens - 1] @ score.T).squeeze(-1)

    rc, rr = reward(chosen, chosen_len), reward(rejected, rejected_len)
    loss = -torch.nn.functional.logsigmoid(rc - rr - margin).mean()
    loss.backward()
    out = {"score.weight": score.detach().clone(), "chosen_ids": chosen, "rejected_ids": rejected,
           "chosen_len": chosen_len, "rejected_len": rejected_len, "margin": margin,
           "reward_chosen": rc.detach(), "reward_rejected": rr.detach(),
           "loss": loss.detach().reshape(()), "grad.score.weight": score.grad.detach().clone()}
    out.update(grads(base.named_parameters(), prefix="model."))
    return out


def adamw_case(gen):
    """Three torch.optim.AdamW steps with the paper's pretraining settings."""
    import torch
    p0 = torch.randn(257, generator=gen)
    gs = [torch.randn(257, generator=gen) for _ in range(3)]
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                            foreach=False)
    for g in gs:
        p.grad = g.clone()
        opt.step()
    return {"p0": p0, "g1": gs[0], "g2": gs[1], "g3": gs[2], "p3": p.detach().clone()}


def readme(name, cfg_d, a, versions, command):
    import textwrap
    c = cfg_d
    items = [
        f"config.json: vocab {c['vocab_size']}, hidden {c['hidden_size']}, intermediate "
        f"{c['intermediate_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} "
        f"query heads, {c['num_key_value_heads']} key/value heads, rope_theta {c['rope_theta']}, "
        f"rms eps {c['rms_norm_eps']}.",
        "model.safetensors: f32 weights under HF names.",
        f"case.safetensors: input_ids and labels [{a.batch},{a.seq_len}] (labels = input_ids with "
        f"the first {a.masked} positions set to -100); logits; loss; grad.NAME for every parameter.",
        f"rm.safetensors: {a.rm_pairs} reward-model pairs on the same base weights (score.weight "
        "applied to the final-norm hidden state at position len-1); rewards, ranking loss, "
        "gradients.",
        "adamw.safetensors: p0, g1..g3, p3 after three torch.optim.AdamW steps (lr 3e-4, betas "
        "(0.9, 0.95), eps 1e-5, weight_decay 0.1).",
    ]
    bullets = "\n".join(textwrap.fill(i, 99, initial_indent="- ", subsequent_indent="  ",
                                       break_on_hyphens=False)
                         for i in items)
    return f"""# {name}

Reference outputs of Hugging Face transformers' LlamaForCausalLM (eager attention, float32),
made by `scripts/make_fixtures.py` with {versions}, seed {a.seed}:

    {command}

{bullets}

The format is the llama2 repository's assets/fixtures/README.md. Weights and inputs depend only on
the seed; the float results may differ in the last bits on another CPU or library version.
"""


def make(name, out, a, make_model, command):
    import torch
    import transformers
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(a.seed)
    model, cfg = make_model(gen)
    check_supported(cfg)
    model.eval()  # no dropout
    out.mkdir(parents=True, exist_ok=True)
    cfg_d = config_dict(cfg)
    (out / "config.json").write_text(json.dumps(cfg_d, indent=2) + "\n")
    weights = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    save_file(weights, out / "model.safetensors")
    save_file(lm_case(model, cfg, gen, a), out / "case.safetensors")
    save_file(rm_case(model, cfg, gen, a, a.init_std), out / "rm.safetensors")
    save_file(adamw_case(gen), out / "adamw.safetensors")
    versions = f"torch {torch.__version__} and transformers {transformers.__version__}"
    (out / "README.md").write_text(readme(name, cfg_d, a, versions, command))
    print(f"wrote {out} ({versions})")


def main(argv):
    a = parse_args(argv)
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        sys.exit(f"{e}: this script needs torch and transformers; see the setup at the top of "
                 f"{__file__}")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # one summation order
    command = "python3 scripts/make_fixtures.py " + " ".join(argv)

    def from_config(d):
        def mk(gen):
            cfg = LlamaConfig(**{**COMMON, **d}, attn_implementation="eager")
            cfg.tie_word_embeddings = False
            model = LlamaForCausalLM(cfg).float()
            randomize(model, gen, a.init_std)
            return model, cfg
        return mk

    if a.preset:
        for name in a.preset:
            make(name, a.out / name, a, from_config(PRESETS[name]), command)
    elif a.config is not None:
        d = json.loads(a.config.read_text())
        make(a.config.stem, a.out, a, from_config(
            {k: v for k, v in d.items() if k in CONFIG_KEYS + ["head_dim"]}), command)
    else:
        def from_checkpoint(gen):
            model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32,
                                                     attn_implementation="eager")
            if model.config.tie_word_embeddings:
                sys.exit("tied embeddings are outside the fixture format (lm_head is its own "
                         "tensor there)")
            return model, model.config
        make(a.model.name, a.out, a, from_checkpoint, command)


if __name__ == "__main__":
    main(sys.argv[1:])
