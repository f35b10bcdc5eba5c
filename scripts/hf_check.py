#!/usr/bin/env python3
"""Checks that checkpoints written by `llama2` work in Hugging Face transformers as they are.

    python3 scripts/hf_check.py --llama2 target/release/llama2 CHECKPOINT_DIR... [--models]

For every checkpoint directory:
  * the files transformers reads are there and well-formed (config.json, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, and generation_config.json for a causal LM);
  * AutoTokenizer loads it with BOS, EOS, UNK and pad set to the config's ids;
  * `apply_chat_template` gives exactly the ids `llama2 tokenize --chat` gives (what the engine
    trains on) on multi-turn dialogues with and without a system prompt, prompts ending with a
    user turn, and whitespace edge cases; both reject the same bad role orders.
With --models (needs torch) it also loads the model with AutoModelForCausalLM or
AutoModelForSequenceClassification, runs it on a chat, and for a reward model compares the score
with `llama2 score` on the same (prompt, response).

Needs transformers (tokenizers, jinja2) and, for --models, torch. Prints one line per check and
ends with `N passed, N failed`; exits 1 on any failure.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

DIALOGUES = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Red."},
    ],
    [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the llama cross the road?"},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "To get to the other pasture."},
        {"role": "user", "content": "Another one, please."},
    ],
    [
        {"role": "system", "content": "  You answer in French.\n"},
        {"role": "user", "content": "  Hi there!  \n"},
        {"role": "assistant", "content": "\nBonjour ! 🦙 "},
        {"role": "user", "content": "And in German?"},
    ],
    [{"role": "system", "content": "s"}, {"role": "user", "content": " "}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "a\n\nb\tc\u001f"}, {"role": "assistant", "content": "multi\nline\n\nanswer\u00a0"}],
    [{"role": "user", "content": "quote ' and \\ and {{ braces }} and <s> inside"}, {"role": "assistant", "content": "ok </s>"}],
]

BAD = [
    [{"role": "assistant", "content": "hi"}],
    [{"role": "system", "content": "s"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
    [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
]

results = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(f"{'PASS' if ok else 'FAIL'}  {name}{'' if ok or not detail else ': ' + detail}", flush=True)


def engine_chat(llama2, tok_json, msgs):
    p = subprocess.run([llama2, "tokenize", "--tokenizer", tok_json, "--chat"], input=json.dumps(msgs),
                       capture_output=True, text=True)
    if p.returncode != 0:
        return None, p.stderr.strip()
    return json.loads(p.stdout), None


def hf_chat(tok, msgs):
    out = tok.apply_chat_template(msgs, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def check_dir(d, llama2, models):
    from transformers import AutoTokenizer

    name = os.path.basename(os.path.normpath(d))
    cfg = json.load(open(os.path.join(d, "config.json")))
    arch = cfg["architectures"][0]
    files = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    if arch == "LlamaForCausalLM":
        files.append("generation_config.json")
    for f in files:
        p = os.path.join(d, f)
        try:
            json.load(open(p))
            check(f"{name}: {f} is JSON", True)
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            check(f"{name}: {f} is JSON", False, str(e))
    tc = json.load(open(os.path.join(d, "tokenizer_config.json")))
    check(f"{name}: tokenizer_config has a chat template", isinstance(tc.get("chat_template"), str))

    tok = AutoTokenizer.from_pretrained(d)
    want = {"bos": cfg.get("bos_token_id", 1), "eos": cfg.get("eos_token_id", 2),
            "pad": cfg.get("pad_token_id", 0)}
    got = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    check(f"{name}: AutoTokenizer ({type(tok).__name__}) has BOS/EOS/pad {want}", got == want, f"got {got}")
    check(f"{name}: AutoTokenizer has UNK", tok.unk_token_id is not None)
    if arch == "LlamaForCausalLM":
        from transformers import GenerationConfig

        g = GenerationConfig.from_pretrained(d)
        gw = (want["bos"], want["eos"], want["pad"])
        check(f"{name}: generation_config BOS/EOS/pad", (g.bos_token_id, g.eos_token_id, g.pad_token_id) == gw,
              f"{(g.bos_token_id, g.eos_token_id, g.pad_token_id)}")

    tok_json = os.path.join(d, "tokenizer.json")
    for i, msgs in enumerate(DIALOGUES):
        ours, err = engine_chat(llama2, tok_json, msgs)
        theirs = hf_chat(tok, msgs)
        roles = "/".join(m["role"][0] for m in msgs)
        check(f"{name}: dialogue {i} ({roles}): apply_chat_template == llama2 tokenize --chat ({len(theirs)} ids)",
              ours == theirs, err or f"\n  ours   {ours}\n  theirs {theirs}")
    for i, msgs in enumerate(BAD):
        ours, err = engine_chat(llama2, tok_json, msgs)
        try:
            hf_chat(tok, msgs)
            hf_err = None
        except Exception as e:  # noqa: BLE001 - any template error is a rejection
            hf_err = str(e)
        check(f"{name}: bad dialogue {i} rejected by both", ours is None and hf_err is not None,
              f"engine: {err or ours}, transformers: {hf_err}")

    if models:
        check_model(d, name, arch, llama2, tok)


def check_model(d, name, arch, llama2, tok):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    chat = DIALOGUES[2]
    ids = torch.tensor([hf_chat(tok, chat)])
    if arch == "LlamaForCausalLM":
        m = AutoModelForCausalLM.from_pretrained(d)
        with torch.no_grad():
            logits = m(ids).logits
        check(f"{name}: AutoModelForCausalLM loads and runs", bool(torch.isfinite(logits).all()),
              "non-finite logits")
        prompt = torch.tensor([hf_chat(tok, chat[:4])])
        out = m.generate(prompt, max_new_tokens=4, do_sample=False)
        check(f"{name}: generate() with generation_config", out.shape[1] > prompt.shape[1])
    else:
        m = AutoModelForSequenceClassification.from_pretrained(d)
        # Two rows of different lengths, right-padded: the head reads each row's last non-pad token.
        rows = [chat, chat[:3]]
        seqs = [hf_chat(tok, r) for r in rows]
        n = max(len(s) for s in seqs)
        batch = torch.tensor([s + [tok.pad_token_id] * (n - len(s)) for s in seqs])
        with torch.no_grad():
            theirs = m(batch, attention_mask=(batch != tok.pad_token_id).long()).logits[:, 0].tolist()
        with tempfile.TemporaryDirectory() as t:
            f = os.path.join(t, "rows.jsonl")
            with open(f, "w") as w:
                for r in rows:
                    w.write(json.dumps({"messages": r}) + "\n")
            p = subprocess.run([llama2, "score", "--rm", d, "--input", f], capture_output=True, text=True)
        if p.returncode != 0:
            check(f"{name}: llama2 score", False, p.stderr.strip())
            return
        ours = [json.loads(line)["score"] for line in p.stdout.splitlines()]
        ok = all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(ours, theirs))
        check(f"{name}: AutoModelForSequenceClassification scores == llama2 score (padded batch)", ok,
              f"ours {ours}, theirs {theirs}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="checkpoint directories written by llama2")
    ap.add_argument("--llama2", default="target/release/llama2", help="the llama2 binary")
    ap.add_argument("--models", action="store_true", help="also load and run the models (needs torch)")
    a = ap.parse_args()
    try:
        import transformers
    except ImportError as e:
        print(f"transformers is not importable ({e}): pip install transformers jinja2", file=sys.stderr)
        return 2
    print(f"transformers {transformers.__version__}")
    for d in a.dirs:
        check_dir(d, a.llama2, a.models)
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
