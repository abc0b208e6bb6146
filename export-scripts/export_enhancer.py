"""Export the prompt enhancer: a Qwen3 causal-LM decoder with a KV cache (docs/enhancer.md).

Add it to a Z-Image package (the text encoder is rewritten to read the same weights file, so
the Qwen3 weights are stored once and, in the SDK, loaded once):

    python export_enhancer.py add --package zimage-turbo --src Z-Image-Turbo

Make a standalone enhancer package from any Hugging Face Qwen3 checkpoint folder (config.json,
*.safetensors, tokenizer.json, tokenizer_config.json):

    python export_enhancer.py standalone --hf Qwen3-4B --out qwen3-4b-enhancer

Both check the written graphs against transformers with ONNX Runtime before finishing.
Only float32 packages are supported (the decoder is written in float32).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from zimage_export.source_folder import check_qwen3_checkpoint, require_source_folder
from zimage_export.enhancer.package import (
    ENHANCER_FORMAT,
    WEIGHTS_FILE,
    check_against_transformers,
    check_chat_template,
    enhancer_section,
    file_entry,
    graph_entry,
    write_graphs,
)


def load_causal_lm(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if model.config.model_type != "qwen3":
        raise ValueError(f"{folder} holds a {model.config.model_type!r} model; only Qwen3 is supported")
    return model


def add_to_package(package: Path, src: Path) -> None:
    from transformers import AutoTokenizer

    manifest_path = package / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("precision") != "fp32":
        raise SystemExit(f"{package} is a {manifest.get('precision')} package; only fp32 packages can carry the enhancer")
    model = load_causal_lm(src / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(src / "tokenizer")
    check_chat_template(tokenizer)
    if model.config.hidden_size != manifest["text_encoder"]["hidden_size"]:
        raise SystemExit("the text encoder in --src does not match the package (hidden_size differs)")
    ext = manifest["graphs"]["text_encoder"].get("external_data")
    old_data = package / ext["path"] if ext else None
    shape = write_graphs(model, package, with_encoder=True)
    if old_data is not None and old_data.name != WEIGHTS_FILE:
        old_data.unlink(missing_ok=True)  # the rewritten encoder reads text_weights.data instead
    diffs = check_against_transformers(model, package, with_encoder=True)
    manifest["graphs"]["text_encoder"] = graph_entry(package, "text_encoder")
    manifest["graphs"]["text_decoder"] = graph_entry(package, "text_decoder")
    manifest["enhancer"] = enhancer_section(shape, model, tokenizer)
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"added the enhancer to {package} (max abs diff vs transformers: {diffs})")


def standalone(hf: Path, out: Path, name: str | None) -> None:
    from transformers import AutoTokenizer

    model = load_causal_lm(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    check_chat_template(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(hf / "tokenizer.json", out / "tokenizer.json")
    shape = write_graphs(model, out, with_encoder=False)
    diffs = check_against_transformers(model, out, with_encoder=False)
    manifest = {
        "format": ENHANCER_FORMAT,
        "format_version": 1,
        "precision": "fp32",
        "source": {"name": name or hf.name, "model_type": "qwen3", "config_sha256": file_entry(hf / "config.json")["sha256"]},
        "tokenizer": file_entry(out / "tokenizer.json"),
        "graphs": {"text_decoder": graph_entry(out, "text_decoder")},
        "enhancer": enhancer_section(shape, model, tokenizer),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out} (max abs diff vs transformers: {diffs})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    add = sub.add_parser("add", help="add the decoder to a Z-Image package made by export.py")
    add.add_argument("--package", type=Path, required=True)
    add.add_argument("--src", type=Path, required=True, help="the diffusers-format folder the package was exported from")
    alone = sub.add_parser("standalone", help="an enhancer package from a Hugging Face Qwen3 checkpoint")
    alone.add_argument("--hf", type=Path, required=True)
    alone.add_argument("--out", type=Path, required=True)
    alone.add_argument("--name")
    args = parser.parse_args(argv)
    start = time.time()
    if args.mode == "add":
        require_source_folder(parser, args.src)
        add_to_package(args.package.resolve(), args.src.resolve())
    else:
        require_source_folder(parser, args.hf, "--hf", check_qwen3_checkpoint)
        standalone(args.hf.resolve(), args.out.resolve(), args.name)
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
