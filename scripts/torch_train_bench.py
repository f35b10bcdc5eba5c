#!/usr/bin/env python3
"""The PyTorch side of `llama2 bench train --vs-torch`: transformers' LlamaForCausalLM on the same
config and batch shape, timed over the same number of steps. On a GPU: bf16 autocast, SDPA
attention, fused AdamW; on the CPU: f32. Prints one JSON line with tokens/s."""
import argparse, json, sys, time

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="an HF config.json")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        print(json.dumps({"error": f"PyTorch/transformers not importable ({e}): pip install torch transformers"}))
        return 2
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if a.device.startswith("cuda") else "cpu")
    cfg = LlamaConfig(**json.load(open(a.config)))
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(dev)
    gpu = dev.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5,
                            weight_decay=0.1, fused=gpu)
    ids = torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len), device=dev)

    def step():
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=gpu):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    loss.item()
    if gpu:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(json.dumps({
        "tokens_per_s": a.batch_size * a.seq_len * a.steps / dt,
        "step_s": dt / a.steps,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": "bf16 autocast" if gpu else "f32",
    }))
    return 0

if __name__ == "__main__":
    sys.exit(main())
