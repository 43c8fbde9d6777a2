"""Loads a `moe export --format hf` directory with transformers and prints its validation loss
on the windows `moe eval` scores, so the two can be compared.

Usage: check-hf-export.py EXPORT_DIR VAL_BIN WINDOWS [--native]

--native: load without remote code (one of transformers' own classes) and check that the
directory holds no Python file. Without a tokenizer.json (a tiny random model made for the
import tests) the tokenizer round trip is skipped.

moe eval scores WINDOWS = batches x ranks x batch_size windows of `context` tokens; window g
starts at token floor((g + 0.5) * W / WINDOWS) of the file, W = tokens - context (DataLoader.swift).
"""
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import os

directory, val_path, windows = sys.argv[1], sys.argv[2], int(sys.argv[3])
native = "--native" in sys.argv[4:]
if native:
    assert not [name for name in os.listdir(directory) if name.endswith(".py")], "a native export carries no code"
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=not native, dtype=torch.float32)
model.eval()
context = model.config.max_position_embeddings

# llm.c token file: 256 int32 header (magic 20240520, version 1, count), then uint16 tokens.
header = np.fromfile(val_path, dtype=np.int32, count=256)
assert header[0] == 20240520, "not a token file"
tokens = np.fromfile(val_path, dtype=np.uint16, offset=1024)[: header[2]].astype(np.int64)
starts = [int((g + 0.5) * (len(tokens) - context) / windows) for g in range(windows)]
inputs = torch.tensor(np.stack([tokens[s : s + context] for s in starts]))
targets = torch.tensor(np.stack([tokens[s + 1 : s + context + 1] for s in starts]))
with torch.no_grad():
    logits = model(input_ids=inputs).logits.double()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    # The labels path (transformers' convention: labels are the inputs, shifted inside).
    window = torch.tensor(tokens[starts[0] : starts[0] + context + 1][None])
    labels_loss = model(input_ids=window[:, :-1], labels=window[:, :-1]).loss.item()
    assert np.isfinite(labels_loss)
    # transformers' defaults (the key/value cache on).
    generated = model.generate(inputs[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12), generated.shape

if os.path.exists(os.path.join(directory, "tokenizer.json")):
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=not native)
    text = "ROMEO. O sweet night!\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text, "tokenizer round trip"
print(json.dumps({"val_loss": loss, "parameters": sum(p.numel() for p in model.parameters()),
                  "class": type(model).__name__}))
