"""Compare a quantized enhanced package's text graphs with its float package (ONNX Runtime
from Python, CPU, 1 thread; docs/quantization.md, "The enhancer"):

    python compare_quantized_enhancer.py FLOAT_PACKAGE QUANTIZED_PACKAGE [PLAIN_QUANTIZED_PACKAGE]

Prints the text encoder's relative L2 against the float one (and its largest difference from
a quantized package without the enhancer, if given), the decoder's logits at the last position
of a fixed 12-token prompt (relative L2), and 16 greedy tokens of each decoder.
"""

import sys

import numpy as np
import onnxruntime as ort

# <|im_start|>user\\n ... <|im_end|>\\n<|im_start|>assistant\\n, with a few ordinary tokens.
IDS = np.array([[151644, 872, 198, 100, 200, 300, 4000, 151645, 198, 151644, 77091, 198]], np.int64)


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def encode(package):
    return session(f"{package}/text_encoder.onnx").run(None, {"input_ids": IDS, "attention_mask": np.ones_like(IDS)})[0]


def greedy(package, steps=16):
    """Greedy tokens and each step's logits, through the KV cache."""
    dec = session(f"{package}/text_decoder.onnx")
    names = [i.name for i in dec.get_inputs()]
    kv = dec.get_inputs()[3].shape
    past = {n: np.zeros((1, kv[1], 0, kv[3]), np.float32) for n in names[3:]}
    feed, total, tokens, logits = IDS, 0, [], []
    for _ in range(steps):
        s = feed.shape[1]
        out = dec.run(None, {"input_ids": feed, "attention_mask": np.ones((1, total + s), np.int64),
                             "position_ids": np.arange(total, total + s)[None], **past})
        total += s
        logits.append(out[0][0])
        past = {names[3 + k]: out[1 + k] for k in range(len(names) - 3)}
        tokens.append(int(out[0][0].argmax()))
        feed = np.array([[tokens[-1]]], np.int64)
    return tokens, logits


def main(argv=None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) not in (2, 3):
        raise SystemExit(__doc__)
    float_pkg, quantized = args[0], args[1]
    e_float, e_quant = encode(float_pkg), encode(quantized)
    print(f"text encoder: rel L2 {rel_l2(e_quant, e_float):.4f} against the float package")
    if len(args) == 3:
        e_plain = encode(args[2])
        print(f"text encoder: max abs {float(np.abs(e_quant - e_plain).max()):.3g} against {args[2]}")
    t_float, l_float = greedy(float_pkg)
    t_quant, l_quant = greedy(quantized)
    same = next((i for i, (a, b) in enumerate(zip(t_float, t_quant)) if a != b), len(t_float))
    print(f"decoder: logits at the prompt's last position rel L2 {rel_l2(l_quant[0], l_float[0]):.4f}")
    print(f"decoder: greedy tokens agree on the first {same} of {len(t_float)}")
    print(f"  float     {t_float}\n  quantized {t_quant}")


if __name__ == "__main__":
    main()
