"""Re-create the committed prompt-enhancer fixtures: the tiny standalone package
models/tiny-qwen3-enhancer and its goldens tests/golden/enhancer/cases.json.

    export-scripts/.venv/bin/python export-scripts/make_enhancer_fixtures.py

1. build a tiny random Qwen3ForCausalLM (hidden 8, 3 layers, 4 heads / 2 KV heads, head_dim 4,
   the real 151,936-token vocabulary, tied embeddings) with fixed seeds, saved in Hugging Face
   format under export-scripts/.cache/enhancer/tiny-qwen3 (not committed);
2. export it with `export_enhancer.py standalone` (which checks ONNX Runtime against transformers);
3. record greedy generations from transformers' generate() (token ids, text, stop reason);
4. add the enhancer to a copy of models/tiny-zimage: models/tiny-zimage-enhanced
   (`export_enhancer.py add`; needs make_fixtures.py's cached tiny-zimage source folder).

Fixture weights, and why they are not plain random draws:
- every embedding row is scaled to unit norm. With hidden size 8, row norms drawn at random vary
  so much that the tied LM head always picks the same few long rows; equal norms make the tiny
  model emit varied tokens, so token-for-token parity means something;
- the `<|im_end|>` row is then scaled by IM_END_SCALE, so that the model ends its answer within
  the token limit for some prompts and not for others: the stop token is exercised by the real
  graph and transformers alike, with no test hook.
The tokenizer is the official Qwen3 tokenizer.json; the package links it from models/tiny-zimage
(a symlink) to keep the repository small.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from zimage_export.fixtures.build import randomize
from zimage_export.fixtures.configs import QWEN3_COMMON
from zimage_export.fixtures.goldens_common import LONG_PROMPT, PROMPTS
from zimage_export.fixtures.tokenizer import tokenizer_source, write_tokenizer_folder

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

NAME = "tiny-qwen3-enhancer"
SEED = 4321
IM_END_SCALE = 1.35
IM_END = 151645
CONFIG = dict(QWEN3_COMMON, hidden_size=8, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=4)
SYSTEM_PROMPT_FILE = REPO / "sdk" / "src" / "enhancer" / "system_prompt.txt"
EOS = [151645, 151643]

# (name, prompt, thinking, max_new_tokens, system prompt or None for the SDK's default)
CASES = [
    ("english_thinking", PROMPTS["english"], True, 24, None),
    ("english_no_thinking", PROMPTS["english"], False, 24, None),
    ("chinese", PROMPTS["chinese"], False, 24, None),
    ("quoted", PROMPTS["mixed_quoted"], True, 20, None),
    ("emoji", PROMPTS["emoji"], False, 24, None),
    ("long", LONG_PROMPT, False, 16, None),
    ("riddle_custom_system", "How many legs do 3 chickens and 2 rabbits have?", False, 24, "Describe the picture."),
    ("short_limit", PROMPTS["english"], True, 3, None),
]


def build_model(config: dict = CONFIG, seed: int = SEED, im_end_scale: float = IM_END_SCALE):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(**config))
    randomize(model, seed)
    model.tie_weights()
    with torch.no_grad():
        w = model.model.embed_tokens.weight
        w.copy_(w / w.norm(dim=1, keepdim=True))
        w[IM_END] *= im_end_scale
    return model.eval()


def build_hf_folder(folder: Path, tok_src: Path, config: dict = CONFIG, seed: int = SEED,
                    im_end_scale: float = IM_END_SCALE) -> Path:
    """A Hugging Face Qwen3 folder of the fixture's model (or, with the arguments, another:
    random_config_parity.py), with the official tokenizer files beside the weights."""
    from transformers import GenerationConfig

    if folder.exists():
        shutil.rmtree(folder)
    model = build_model(config, seed, im_end_scale)
    model.generation_config = GenerationConfig(eos_token_id=EOS, pad_token_id=151643, do_sample=False)
    model.save_pretrained(folder)
    write_tokenizer_folder(tok_src, folder / "tok")
    for f in (folder / "tok").iterdir():
        shutil.move(str(f), folder / f.name)
    (folder / "tok").rmdir()
    return folder


def record_goldens(hf: Path, out: Path, cases_to_run: list = CASES, package: str = f"models/{NAME}",
                   tokenizer_dir: Path | None = None, quiet: bool = False) -> None:
    """Greedy generations of the causal LM in `hf` (its tokenizer there or in `tokenizer_dir`)
    for `cases_to_run` (CASES' format), written to out/cases.json for `package`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or hf)
    default_system = SYSTEM_PROMPT_FILE.read_text().strip()
    cases = []
    for name, prompt, thinking, max_new, system in cases_to_run:
        messages = [{"role": "system", "content": system or default_system}, {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            result = model.generate(**ids, max_new_tokens=max_new, do_sample=False, eos_token_id=EOS, pad_token_id=151643,
                                    output_scores=True, return_dict_in_generate=True)
        new = result.sequences[0, ids["input_ids"].shape[1]:].tolist()
        stopped = bool(new) and new[-1] in EOS
        body = new[:-1] if stopped else new
        margins = [float((lambda t: t[0] - t[1])(torch.topk(s[0], 2).values)) for s in result.scores]
        cases.append({
            "name": name,
            "prompt": prompt,
            "system_prompt": system,  # null = the SDK's default (sdk/src/enhancer/system_prompt.txt)
            "thinking": thinking,
            "max_new_tokens": max_new,
            "prompt_ids": ids["input_ids"][0].tolist(),
            "generated_ids": new,
            "finish": "stop" if stopped else "length",
            "raw_text": tokenizer.decode(body, skip_special_tokens=True),
            "min_top2_logit_margin": min(margins),
        })
        if not quiet:
            print(f"{name}: {len(ids['input_ids'][0])} prompt tokens, {len(new)} generated, {cases[-1]['finish']}, "
                  f"min margin {min(margins):.1e}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    golden = {
        "about": f"transformers generate() greedy on {package}; made by export-scripts/make_enhancer_fixtures.py",
        "package": package,
        "eos_token_ids": EOS,
        "default_system_prompt": default_system,
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cache = HERE / ".cache"
    tok_src = tokenizer_source(cache, None)
    hf = build_hf_folder(cache / "enhancer" / "tiny-qwen3", tok_src)
    package = REPO / "models" / NAME
    if package.exists():
        shutil.rmtree(package)
    subprocess.run([sys.executable, str(HERE / "export_enhancer.py"), "standalone", "--hf", hf, "--out", package,
                    "--name", NAME], check=True)
    # The tokenizer is 11 MB: link the identical copy that models/tiny-zimage commits.
    (package / "tokenizer.json").unlink()
    os.symlink("../tiny-zimage/tokenizer.json", package / "tokenizer.json")
    record_goldens(hf, REPO / "tests" / "golden" / "enhancer")
    build_combined_package(cache)


def build_combined_package(cache: Path) -> None:
    """models/tiny-zimage-enhanced: a copy of models/tiny-zimage with the enhancer added
    (`export_enhancer.py add`), the text encoder rewritten to share text_weights.data. The
    tests load it as a Pipeline and attach the enhancer to it (one weights file, one cancel
    handle). Its tokenizer, transformer and VAE files are byte-identical to tiny-zimage's, so
    git stores them once; what is new is text_weights.data (9.9 MB), the two small graphs and
    the manifest. Needs the diffusers-format tiny-zimage folder that make_fixtures.py builds
    in the cache (the text encoder's full Qwen3, whose last layer and final norm the package's
    encoder graph leaves out)."""
    src = cache / "src" / "tiny-zimage"
    if not src.exists():
        print(f"skipping the combined package: {src} is missing (run make_fixtures.py --only tiny-zimage first)")
        return
    out = REPO / "models" / "tiny-zimage-enhanced"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(REPO / "models" / "tiny-zimage", out, symlinks=False)
    subprocess.run([sys.executable, str(HERE / "export_enhancer.py"), "add", "--package", out, "--src", src], check=True)


if __name__ == "__main__":
    main()
