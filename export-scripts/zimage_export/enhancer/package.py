"""Writing the enhancer graphs into a package: a standalone enhancer package, or a Z-Image
package whose text encoder then shares one weights file with the decoder."""

import json
from pathlib import Path

import numpy as np
import onnx

from ..manifest import file_entry

from .graph_builder import Qwen3Shape, build_decoder, build_encoder, weights_from_model
from .names import past_names
from .weights_file import attach, write_weights

WEIGHTS_FILE = "text_weights.data"
ENHANCER_FORMAT = "zimage-enhancer-package"

# Qwen3's chat template (system + one user turn + generation prompt), as the tokenizer_config's
# Jinja renders it; `chat_template_pieces` checks this against the checkpoint's own template.
PROMPT_TEMPLATE = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
THINKING_OFF_SUFFIX = "<think>\n\n</think>\n\n"


def check_chat_template(tokenizer) -> None:
    """Refuses a checkpoint whose chat template renders differently from PROMPT_TEMPLATE."""
    messages = [{"role": "system", "content": "S y s"}, {"role": "user", "content": "P r o m p t"}]
    for thinking, suffix in ((True, ""), (False, THINKING_OFF_SUFFIX)):
        got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        want = PROMPT_TEMPLATE.format(system="S y s", prompt="P r o m p t") + suffix
        if got != want:
            raise ValueError(f"the checkpoint's chat template (enable_thinking={thinking}) renders {got!r}, expected {want!r}")


def eos_token_ids(model, tokenizer) -> list[int]:
    gen = getattr(model, "generation_config", None)
    ids = getattr(gen, "eos_token_id", None) if gen is not None else None
    if ids is None:
        ids = model.config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end not in ids:
        ids.insert(0, im_end)
    return [int(i) for i in ids]


def enhancer_section(shape: Qwen3Shape, model, tokenizer) -> dict:
    think = [tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
    return {
        "hidden_size": shape.hidden_size,
        "num_layers": shape.num_layers,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "max_positions": int(model.config.max_position_embeddings),
        "eos_token_ids": eos_token_ids(model, tokenizer),
        "think_token_ids": think,
        "prompt_template": PROMPT_TEMPLATE,
        "thinking_off_suffix": THINKING_OFF_SUFFIX,
    }


def graph_entry(package: Path, name: str) -> dict:
    from ..onnx_io import graph_io

    path = package / f"{name}.onnx"
    inputs, outputs = graph_io(path)
    return {**file_entry(path), "external_data": file_entry(package / WEIGHTS_FILE), "inputs": inputs, "outputs": outputs}


def write_graphs(model, out: Path, with_encoder: bool) -> Qwen3Shape:
    """text_decoder.onnx (+ text_encoder.onnx) reading one text_weights.data."""
    shape = Qwen3Shape.from_config(model.config)
    weights = weights_from_model(model)
    graphs = {"text_decoder": build_decoder(shape)}
    if with_encoder:
        graphs["text_encoder"] = build_encoder(shape)
    used = {i for g in graphs.values() for node in g.graph.node for i in node.input}
    names = [n for n in weights if n in used]  # the encoder never reads the last layer or the final norm
    places = write_weights(weights, names, out / WEIGHTS_FILE)
    for name, graph in graphs.items():
        attach(graph, weights, places, WEIGHTS_FILE)
        onnx.save(graph, out / f"{name}.onnx")
        onnx.checker.check_model(str(out / f"{name}.onnx"))
    return shape


def check_against_transformers(model, out: Path, with_encoder: bool, atol: float = 1e-4) -> dict:
    """Runs the written graphs with ONNX Runtime on a short prompt (batch 2, left/right padded)
    and compares with transformers. Returns the max abs differences."""
    import onnxruntime as ort
    import torch

    ids = torch.tensor([[151644, 872, 198, 100, 200, 300, 151645], [151644, 872, 198, 400, 151645, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    diffs = {}
    if with_encoder:
        enc = ort.InferenceSession(str(out / "text_encoder.onnx"))
        hidden = enc.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        want = ref.hidden_states[-2].numpy()
        diffs["text_encoder"] = max(float(np.abs(hidden[0] - want[0]).max()), float(np.abs(hidden[1, :5] - want[1, :5]).max()))
    dec = ort.InferenceSession(str(out / "text_decoder.onnx"))
    s = Qwen3Shape.from_config(model.config)
    # Prefill 4 tokens of row 0, then one cached step.
    empty = np.zeros((1, s.num_kv_heads, 0, s.head_dim), np.float32)
    feeds = {"input_ids": ids[:1, :4].numpy(), "attention_mask": np.ones((1, 4), np.int64), "position_ids": np.arange(4)[None]}
    feeds |= {name: empty for i in range(s.num_layers) for name in past_names(i)}
    first = dec.run(None, feeds)
    with torch.no_grad():
        want4 = model(input_ids=ids[:1, :4]).logits[0, -1].numpy()
        want5 = model(input_ids=ids[:1, :5]).logits[0, -1].numpy()
    feeds = {"input_ids": ids[:1, 4:5].numpy(), "attention_mask": np.ones((1, 5), np.int64), "position_ids": np.array([[4]])}
    feeds |= {name: first[1 + 2 * i + j] for i in range(s.num_layers) for j, name in enumerate(past_names(i))}
    second = dec.run(None, feeds)
    diffs["text_decoder"] = max(float(np.abs(first[0][0] - want4).max()), float(np.abs(second[0][0] - want5).max()))
    for name, d in diffs.items():
        scale = 1.0 + float(np.abs(want4).max())
        if not d <= atol * scale:
            raise AssertionError(f"{name}: ONNX Runtime differs from transformers by {d} (tolerance {atol * scale})")
    return diffs
