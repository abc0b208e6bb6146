//! LoRA files as people download them, turned into one form: per diffusers module name
//! (`layers.0.attention.to_q`), a low-rank pair or LoKr factors, and the factor diffusers
//! would scale it by. The formats are those diffusers 0.42.1's `ZImageLoraLoaderMixin` reads:
//!
//! - diffusers / PEFT: `transformer.<module>.lora_A.weight` / `.lora_B.weight`; `lora_alpha`,
//!   `r`, `alpha_pattern`, `rank_pattern`, `use_rslora` from the safetensors metadata
//!   (`lora_adapter_metadata`, written by `save_lora_weights`) when present, else scale 1;
//! - kohya / sd-scripts: `lora_unet_layers_0_attention_to_q.lora_down.weight` / `.lora_up.weight`
//!   / `.alpha` (scale `alpha / rank`), including a fused `attention_qkv` pair whose up matrix is
//!   split in three (to_q, to_k, to_v; the down matrix shared) and `attention_out` for `to_out.0`;
//! - ComfyUI / musubi-tuner: the same with a `diffusion_model.` prefix and dotted module names;
//! - PEFT's `lora_A.default.weight` names;
//! - Anime-Z's `.lora.down.weight` / `.lora.up.weight`, with its redundant fused and bare-out
//!   copies dropped when split keys are present, as diffusers does;
//! - LoKr (`.lokr_w1`, `.lokr_w1_a/_b`, `.lokr_w2`, `.lokr_w2_a/_b`, `.alpha`; alpha applies only
//!   when a factor is rank-decomposed, over the rank of that decomposition).
//!
//! DoRA's `dora_scale` keys are dropped (diffusers drops them too, with a warning). Keys that
//! fit none of these, LoRA biases and DoRA magnitude vectors are refused with the key named.

use std::collections::{BTreeMap, BTreeSet};

use super::update::{Factor, Matrix, Update};

/// A tensor as read from the file: its key, shape and values in float32.
pub(crate) struct RawTensor {
    pub key: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// One module's update and where it came from.
#[derive(Debug, Clone)]
pub(crate) struct ModuleUpdate {
    pub update: Update,
    /// The key (as written in the file) the update was read from, for messages.
    pub source_key: String,
    /// The strength diffusers applies at scale 1: `alpha / rank` and PEFT's config factor.
    pub factor: f32,
}

/// Parses the tensors of one file into updates by diffusers module name.
pub(crate) fn convert(
    tensors: Vec<RawTensor>,
    metadata: Option<&str>,
) -> Result<BTreeMap<String, ModuleUpdate>, String> {
    let tensors: Vec<RawTensor> = tensors.into_iter().filter(|t| !t.key.contains("dora_scale")).collect();
    if tensors.is_empty() {
        return Err("the file holds no LoRA tensors".into());
    }
    for t in &tensors {
        if let Some(i) = t.values.iter().position(|v| !v.is_finite()) {
            return Err(format!("tensor {} has a non-finite value ({}) at index {i}", t.key, t.values[i]));
        }
    }
    if tensors.iter().any(|t| t.key.contains(".lokr_")) {
        return convert_lokr(tensors);
    }
    let peft = match metadata {
        Some(text) => Some(PeftConfig::parse(text)?),
        None => None,
    };
    convert_lora(tensors, peft.as_ref())
}

/// What a key names once its format's spelling is undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
}

/// diffusers' renaming, in its order: `diffusion_model.` stripped, kohya names dotted (keeping
/// `to_q/k/v/out` and `feed_forward` whole), `.out` -> `.to_out.0`, PEFT's `default.` dropped,
/// and the module names that contain underscores put back together.
fn normalise_keys(tensors: &mut [RawTensor]) {
    let has = |tensors: &[RawTensor], p: &str| tensors.iter().any(|t| t.key.starts_with(p));
    if has(tensors, "diffusion_model.") {
        for t in tensors.iter_mut() {
            if let Some(rest) = t.key.strip_prefix("diffusion_model.") {
                t.key = rest.to_string();
            }
        }
    }
    if has(tensors, "lora_unet_") {
        for t in tensors.iter_mut() {
            let key = t.key.strip_prefix("lora_unet_").unwrap_or(&t.key);
            t.key = dotted_kohya_name(key);
        }
    }
    for t in tensors.iter_mut() {
        t.key = out_to_to_out(&t.key);
    }
    if tensors.iter().any(|t| t.key.contains("default.")) {
        for t in tensors.iter_mut() {
            t.key = t.key.replace("default.", "");
        }
    }
    const FIXUPS: [(&str, &str); 7] = [
        ("context.refiner.", "context_refiner."),
        ("noise.refiner.", "noise_refiner."),
        ("adaLN.modulation.", "adaLN_modulation."),
        ("all.final.layer.", "all_final_layer."),
        ("all.x.embedder.", "all_x_embedder."),
        ("cap.embedder.", "cap_embedder."),
        ("t.embedder.", "t_embedder."),
    ];
    for t in tensors.iter_mut() {
        for (dotted, joined) in FIXUPS {
            t.key = t.key.replace(dotted, joined);
        }
    }
}

/// `layers_0_attention_to_q.lora_down.weight` -> `layers.0.attention.to.q.lora.down.weight`
/// would be wrong for the module: the part before the last dot is split on `_` and re-joined
/// with dots, except the pairs `to_q`, `to_k`, `to_v`, `to_out`, `feed_forward`. (Like
/// diffusers, the `lora_down` suffix comes out as `lora.down`, the "dot" spelling.)
fn dotted_kohya_name(key: &str) -> String {
    let (base, suffix) = match key.rsplit_once('.') {
        Some((b, s)) => (b, Some(s)),
        None => (key, None),
    };
    const PAIRS: [(&str, &str); 5] = [("to", "q"), ("to", "k"), ("to", "v"), ("to", "out"), ("feed", "forward")];
    let parts: Vec<&str> = base.split('_').collect();
    let mut merged: Vec<String> = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        if i + 1 < parts.len() && PAIRS.contains(&(parts[i], parts[i + 1])) {
            merged.push(format!("{}_{}", parts[i], parts[i + 1]));
            i += 2;
        } else {
            merged.push(parts[i].to_string());
            i += 1;
        }
    }
    let mut name = merged.join(".");
    if let Some(s) = suffix {
        name.push('.');
        name.push_str(s);
    }
    name
}

/// `.out.lora_down.weight`, `.out.lora_up.weight`, `.out.alpha` -> `.to_out.0...` (keys that
/// already say `.to_out` are left alone).
fn out_to_to_out(key: &str) -> String {
    if key.contains(".to_out") {
        return key.to_string();
    }
    for tail in [".lora_down.weight", ".lora_up.weight", ".alpha"] {
        if let Some(head) = key.strip_suffix(&format!(".out{tail}")) {
            return format!("{head}.to_out.0{tail}");
        }
    }
    key.to_string()
}

/// Module name and role of a normalised key, in any of the three spellings.
fn split_role(key: &str) -> Option<(&str, Role, &'static str)> {
    const SUFFIXES: [(&str, Role, &str); 7] = [
        (".lora_A.weight", Role::Down, "lora_A/lora_B"),
        (".lora_B.weight", Role::Up, "lora_A/lora_B"),
        (".lora_down.weight", Role::Down, "lora_down/lora_up"),
        (".lora_up.weight", Role::Up, "lora_down/lora_up"),
        (".lora.down.weight", Role::Down, "lora.down/lora.up"),
        (".lora.up.weight", Role::Up, "lora.down/lora.up"),
        (".alpha", Role::Alpha, ""),
    ];
    SUFFIXES.iter().find_map(|(suffix, role, spelling)| key.strip_suffix(suffix).map(|m| (m, *role, *spelling)))
}

#[derive(Default)]
struct Pair {
    down: Option<(String, Matrix)>,
    up: Option<(String, Matrix)>,
    alpha: Option<(String, f32)>,
}

/// The largest side of a LoRA matrix: far above any model width, and small enough that the
/// products of two sides (a LoKr target's shape, a weight's element count) cannot overflow.
const MAX_MATRIX_SIDE: usize = 1 << 20;

fn matrix(t: RawTensor) -> Result<(String, Matrix), String> {
    let (rows, cols) = match t.shape.as_slice() {
        [rows, cols] => (*rows, *cols),
        // kohya writes 1x1 convolutions' LoRAs as [r, in, 1, 1]; a Linear LoRA may come so too.
        [rows, cols, 1, 1] => (*rows, *cols),
        other => return Err(format!("tensor {} has shape {other:?}: LoRA matrices are 2-D", t.key)),
    };
    // An empty side holds no values whatever the other claims: a file could pair it with a
    // side of 2^63 and make shape arithmetic wrap.
    if !(1..=MAX_MATRIX_SIDE).contains(&rows) || !(1..=MAX_MATRIX_SIDE).contains(&cols) {
        return Err(format!("tensor {} has shape {:?}: each side must be 1..={MAX_MATRIX_SIDE}", t.key, t.shape));
    }
    Ok((t.key, Matrix { rows, cols, data: t.values }))
}

fn convert_lora(
    mut tensors: Vec<RawTensor>,
    peft: Option<&PeftConfig>,
) -> Result<BTreeMap<String, ModuleUpdate>, String> {
    let original: Vec<String> = tensors.iter().map(|t| t.key.clone()).collect();
    normalise_keys(&mut tensors);
    let original_of = |normalised_index: usize| original[normalised_index].clone();
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    let mut spellings = BTreeSet::new();
    for (index, t) in tensors.into_iter().enumerate() {
        let source = original_of(index);
        if t.key.contains("lora_magnitude_vector") {
            return Err(format!("tensor {source}: DoRA adapters are not supported"));
        }
        let Some((module, role, spelling)) = split_role(&t.key) else {
            return Err(format!("tensor {source} is not a LoRA weight this reader knows (lora_A/lora_B, lora_down/lora_up, alpha, lokr_*)"));
        };
        let module = module.strip_prefix("transformer.").unwrap_or(module);
        // kohya's `to_q.lora_down` comes out of the renaming as `to.q.lora.down` (diffusers too).
        let module = match module.rsplit_once(".to.") {
            Some((head, p)) if role != Role::Alpha && ["q", "k", "v"].contains(&p) => format!("{head}.to_{p}"),
            _ => module.to_string(),
        };
        if !spelling.is_empty() {
            spellings.insert(spelling);
        }
        let pair = pairs.entry(module).or_default();
        let slot_taken = match role {
            Role::Down => pair.down.is_some(),
            Role::Up => pair.up.is_some(),
            Role::Alpha => pair.alpha.is_some(),
        };
        if slot_taken {
            return Err(format!("tensor {source} names a module that another key already gave this role"));
        }
        match role {
            Role::Alpha => {
                if t.values.len() != 1 {
                    return Err(format!("tensor {source}: alpha must be one number, shape {:?}", t.shape));
                }
                pair.alpha = Some((source, t.values[0]));
            }
            Role::Down => pair.down = Some(matrix(RawTensor { key: source, ..t })?),
            Role::Up => pair.up = Some(matrix(RawTensor { key: source, ..t })?),
        }
    }
    if spellings.len() > 1 {
        return Err(format!("the file mixes LoRA key spellings ({spellings:?}); diffusers reads only one per file"));
    }
    drop_redundant_dot_keys(&mut pairs);
    let mut out = BTreeMap::new();
    for (module, pair) in pairs {
        let Pair { down, up, alpha } = pair;
        let (down_key, down) = match down {
            Some(d) => d,
            None => {
                let key = up.map(|u| u.0).or(alpha.map(|a| a.0)).unwrap_or_default();
                return Err(format!("tensor {key} has no matching down (lora_A) matrix"));
            }
        };
        let Some((up_key, up)) = up else {
            return Err(format!("tensor {down_key} has no matching up (lora_B) matrix"));
        };
        let rank = down.rows;
        let fused_qkv = module.ends_with(".qkv");
        let up_rank_ok = up.cols == rank && (!fused_qkv || up.rows % 3 == 0);
        if !up_rank_ok || rank == 0 {
            return Err(format!(
                "rank mismatch: {down_key} has shape [{}, {}] and {up_key} [{}, {}] (down is [rank, in], up [out, rank]{})",
                down.rows,
                down.cols,
                up.rows,
                up.cols,
                if fused_qkv { ", a fused qkv up matrix's rows a multiple of 3" } else { "" }
            ));
        }
        let alpha_factor = alpha.as_ref().map_or(1.0, |(_, a)| a / rank as f32);
        if !alpha_factor.is_finite() {
            return Err(format!("{down_key}: alpha / rank is not finite"));
        }
        let peft_factor = match peft {
            Some(config) => config.factor(&module, rank).map_err(|e| format!("{down_key}: {e}"))?,
            None => 1.0,
        };
        let factor = alpha_factor * peft_factor;
        if !factor.is_finite() {
            return Err(format!("{down_key}: alpha / rank times the metadata's factor is not finite"));
        }
        if let Some(block) = module.strip_suffix(".qkv") {
            let third = up.rows / 3;
            for (k, proj) in ["to_q", "to_k", "to_v"].iter().enumerate() {
                let chunk = Matrix {
                    rows: third,
                    cols: rank,
                    data: up.data[k * third * rank..(k + 1) * third * rank].to_vec(),
                };
                let name = format!("{block}.{proj}");
                if out.contains_key(&name) {
                    return Err(format!("tensor {down_key}: a fused qkv LoRA next to one for {name}"));
                }
                let update = Update::LowRank { up: chunk, down: down.clone(), alpha: None };
                out.insert(name, ModuleUpdate { update, source_key: down_key.clone(), factor });
            }
            continue;
        }
        if out.contains_key(&module) {
            return Err(format!("tensor {down_key}: a second LoRA for module {module}"));
        }
        let update = Update::LowRank { up, down, alpha: alpha.map(|a| a.1) };
        out.insert(module, ModuleUpdate { update, source_key: down_key, factor });
    }
    Ok(out)
}

/// Anime-Z files carry a fused `qkv` and a bare `out` copy next to the split `to_q/k/v` and
/// `to_out.0` keys; diffusers skips the copies, and so does this.
fn drop_redundant_dot_keys(pairs: &mut BTreeMap<String, Pair>) {
    let modules: Vec<String> = pairs.keys().cloned().collect();
    for module in modules {
        if let Some(block) = module.strip_suffix(".qkv") {
            let split = ["to_q", "to_k", "to_v"].iter().any(|p| pairs.contains_key(&format!("{block}.{p}")));
            if split {
                pairs.remove(&module);
            }
        }
    }
    // A bare `.out` pair (kohya's `attention_out` comes here as `.out` only when it was spelt
    // with dots) is `to_out.0`, unless `to_out.0` is there too.
    let outs: Vec<String> = pairs.keys().filter(|m| m.ends_with(".out") && !m.contains(".to_out")).cloned().collect();
    for module in outs {
        let block = module.strip_suffix(".out").unwrap_or(&module).to_string();
        let target = format!("{block}.to_out.0");
        let pair = pairs.remove(&module).unwrap_or_default();
        if pairs.contains_key(&target) && pairs[&target].down.is_some() {
            continue;
        }
        let entry = pairs.entry(target).or_default();
        entry.down = entry.down.take().or(pair.down);
        entry.up = entry.up.take().or(pair.up);
        entry.alpha = entry.alpha.take().or(pair.alpha);
    }
}

fn convert_lokr(mut tensors: Vec<RawTensor>) -> Result<BTreeMap<String, ModuleUpdate>, String> {
    #[derive(Default)]
    struct Parts {
        first_key: String,
        w: [Option<Matrix>; 6],
        alpha: Option<f32>,
    }
    const SUFFIXES: [&str; 6] = ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"];
    let original: Vec<String> = tensors.iter().map(|t| t.key.clone()).collect();
    for t in tensors.iter_mut() {
        for prefix in ["diffusion_model.", "transformer."] {
            if let Some(rest) = t.key.strip_prefix(prefix) {
                t.key = rest.to_string();
            }
        }
    }
    let mut modules: BTreeMap<String, Parts> = BTreeMap::new();
    for (index, t) in tensors.into_iter().enumerate() {
        let source = original[index].clone();
        let (module, part) = t.key.rsplit_once('.').ok_or_else(|| format!("tensor {source} is not a LoKr weight"))?;
        let parts = modules.entry(module.to_string()).or_default();
        if parts.first_key.is_empty() {
            parts.first_key = source.clone();
        }
        if part == "alpha" {
            if t.values.len() != 1 {
                return Err(format!("tensor {source}: alpha must be one number"));
            }
            parts.alpha = Some(t.values[0]);
            continue;
        }
        let Some(slot) = SUFFIXES.iter().position(|s| *s == part) else {
            return Err(format!(
                "tensor {source} is not a LoKr weight this reader knows (lokr_w1[_a|_b], lokr_w2[_a|_b], alpha)"
            ));
        };
        parts.w[slot] = Some(matrix(RawTensor { key: source, ..t })?.1);
    }
    let mut out = BTreeMap::new();
    for (module, parts) in modules {
        let [w1, w1_a, w1_b, w2, w2_a, w2_b] = parts.w;
        let key = parts.first_key;
        let factor = |full: Option<Matrix>, a: Option<Matrix>, b: Option<Matrix>, name: &str| match (full, a, b) {
            (Some(m), None, None) => Ok(Factor::Full(m)),
            (None, Some(a), Some(b)) if a.cols == b.rows => Ok(Factor::LowRank(a, b)),
            (None, Some(a), Some(b)) => Err(format!(
                "rank mismatch in {key}: {name}_a is [{}, {}] and {name}_b [{}, {}]",
                a.rows, a.cols, b.rows, b.cols
            )),
            _ => Err(format!("{key}: {name} needs either lokr_{name} or both lokr_{name}_a and lokr_{name}_b")),
        };
        let rank = w2_b.as_ref().map(|b| b.rows).or(w1_b.as_ref().map(|b| b.rows));
        let w1 = factor(w1, w1_a, w1_b, "w1")?;
        let w2 = factor(w2, w2_a, w2_b, "w2")?;
        let factor = match (parts.alpha, rank) {
            (Some(alpha), Some(rank)) if rank > 0 => alpha / rank as f32,
            _ => 1.0,
        };
        out.insert(
            module,
            ModuleUpdate { update: Update::Lokr { w1, w2, alpha: parts.alpha }, source_key: key, factor },
        );
    }
    Ok(out)
}

/// The parts of a PEFT `LoraConfig` (as diffusers writes it into the safetensors metadata,
/// keys prefixed `transformer.`) that decide a module's scale.
#[derive(Debug, Default)]
struct PeftConfig {
    r: Option<f64>,
    lora_alpha: Option<f64>,
    rank_pattern: BTreeMap<String, f64>,
    alpha_pattern: BTreeMap<String, f64>,
    use_rslora: bool,
}

impl PeftConfig {
    fn parse(text: &str) -> Result<PeftConfig, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("lora_adapter_metadata is not JSON: {e}"))?;
        let map = value.as_object().ok_or("lora_adapter_metadata is not a JSON object")?;
        let get = |name: &str| map.get(&format!("transformer.{name}")).or_else(|| map.get(name));
        let number = |name: &str| get(name).and_then(|v| v.as_f64());
        let patterns = |name: &str| -> BTreeMap<String, f64> {
            get(name)
                .and_then(|v| v.as_object())
                .map(|o| o.iter().filter_map(|(k, v)| v.as_f64().map(|n| (k.clone(), n))).collect())
                .unwrap_or_default()
        };
        if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err("DoRA adapters (use_dora) are not supported".into());
        }
        Ok(PeftConfig {
            r: number("r"),
            lora_alpha: number("lora_alpha"),
            rank_pattern: patterns("rank_pattern"),
            alpha_pattern: patterns("alpha_pattern"),
            use_rslora: get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
        })
    }

    /// `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA) for one module, with PEFT's pattern
    /// look-up: a pattern matches a module name that equals it or ends in `.` + it.
    fn factor(&self, module: &str, tensor_rank: usize) -> Result<f32, String> {
        let r = pattern_value(&self.rank_pattern, module)?.or(self.r).unwrap_or(tensor_rank as f64);
        let alpha = pattern_value(&self.alpha_pattern, module)?.or(self.lora_alpha).unwrap_or(r);
        // (A fractional rank would pass the comparison truncated and scale by alpha / 4.7.)
        if r.fract() != 0.0 || r as usize != tensor_rank {
            return Err(format!("the metadata says rank {r}, the matrices have rank {tensor_rank}"));
        }
        let f = (if self.use_rslora { alpha / r.sqrt() } else { alpha / r }) as f32;
        // Checked here, at load, as float32 (a lora_alpha of 1e300 is finite as an f64).
        if !f.is_finite() {
            return Err(format!("the metadata's lora_alpha {alpha} over rank {r} is not a finite float32 factor"));
        }
        Ok(f)
    }
}

fn pattern_value(patterns: &BTreeMap<String, f64>, module: &str) -> Result<Option<f64>, String> {
    for (pattern, value) in patterns {
        let (anchored, literal) = match pattern.strip_prefix('^') {
            Some(rest) => (true, rest),
            None => (false, pattern.as_str()),
        };
        if literal.chars().any(|c| "*+?()[]{}|$\\".contains(c)) {
            return Err(format!("metadata pattern {pattern:?} is a regular expression this reader does not evaluate"));
        }
        let matches = module == literal || (!anchored && module.ends_with(&format!(".{literal}")));
        if matches {
            return Ok(Some(*value));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(key: &str, shape: &[usize]) -> RawTensor {
        let n = shape.iter().product();
        RawTensor { key: key.into(), shape: shape.to_vec(), values: (0..n).map(|i| i as f32 * 0.01).collect() }
    }

    #[test]
    fn kohya_names_become_diffusers_names() {
        assert_eq!(dotted_kohya_name("layers_0_attention_to_q.alpha"), "layers.0.attention.to_q.alpha");
        assert_eq!(
            dotted_kohya_name("noise_refiner_1_feed_forward_w2.lora_down.weight"),
            "noise.refiner.1.feed_forward.w2.lora.down.weight"
        );
        let files = vec![
            t("lora_unet_layers_0_attention_to_q.lora_down.weight", &[2, 8]),
            t("lora_unet_layers_0_attention_to_q.lora_up.weight", &[8, 2]),
            RawTensor { key: "lora_unet_layers_0_attention_to_q.alpha".into(), shape: vec![], values: vec![1.0] },
            t("lora_unet_context_refiner_0_attention_out.lora_down.weight", &[2, 8]),
            t("lora_unet_context_refiner_0_attention_out.lora_up.weight", &[8, 2]),
            t("lora_unet_layers_1_attention_qkv.lora_down.weight", &[2, 8]),
            t("lora_unet_layers_1_attention_qkv.lora_up.weight", &[24, 2]),
            t("lora_unet_layers_1_adaLN_modulation_0.lora_down.weight", &[2, 8]),
            t("lora_unet_layers_1_adaLN_modulation_0.lora_up.weight", &[32, 2]),
        ];
        let out = convert(files, None).unwrap();
        let names: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "context_refiner.0.attention.to_out.0",
                "layers.0.attention.to_q",
                "layers.1.adaLN_modulation.0",
                "layers.1.attention.to_k",
                "layers.1.attention.to_q",
                "layers.1.attention.to_v",
            ]
        );
        assert_eq!(out["layers.0.attention.to_q"].factor, 0.5);
        assert_eq!(out["layers.1.attention.to_k"].factor, 1.0);
        let Update::LowRank { up, .. } = &out["layers.1.attention.to_k"].update else { panic!() };
        assert_eq!((up.rows, up.cols), (8, 2));
        assert_eq!(up.data[0], 0.16); // row 8 of the fused up matrix
    }

    #[test]
    fn peft_and_comfy_names() {
        let peft = vec![
            t("transformer.layers.0.feed_forward.w1.lora_A.weight", &[4, 8]),
            t("transformer.layers.0.feed_forward.w1.lora_B.weight", &[16, 4]),
        ];
        let meta = r#"{"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"w1": 2}}"#;
        let out = convert(peft, Some(meta)).unwrap();
        assert_eq!(out["layers.0.feed_forward.w1"].factor, 0.5);
        let comfy = vec![
            t("diffusion_model.layers.0.attention.to_out.0.lora_A.default.weight", &[4, 8]),
            t("diffusion_model.layers.0.attention.to_out.0.lora_B.default.weight", &[8, 4]),
            RawTensor {
                key: "diffusion_model.layers.0.attention.to_out.0.alpha".into(),
                shape: vec![],
                values: vec![8.0],
            },
        ];
        let out = convert(comfy, None).unwrap();
        assert_eq!(out["layers.0.attention.to_out.0"].factor, 2.0);
    }

    /// A factor that is finite as the metadata's f64 but not as float32 is refused when the
    /// file is read (it was found only when merging).
    #[test]
    fn a_metadata_alpha_beyond_float32_is_refused_at_load() {
        let peft = || {
            vec![
                t("transformer.layers.0.feed_forward.w1.lora_A.weight", &[4, 8]),
                t("transformer.layers.0.feed_forward.w1.lora_B.weight", &[16, 4]),
            ]
        };
        let e = convert(peft(), Some(r#"{"transformer.r": 4, "transformer.lora_alpha": 1e300}"#)).unwrap_err();
        assert!(e.contains("not a finite float32 factor"), "{e}");
        assert!(convert(peft(), Some(r#"{"transformer.r": 4, "transformer.lora_alpha": 1e30}"#)).is_ok());
        // A rank that is not a whole number is refused, not truncated to the matrices' rank.
        let e = convert(peft(), Some(r#"{"transformer.r": 4.7, "transformer.lora_alpha": 8}"#)).unwrap_err();
        assert!(e.contains("rank 4.7"), "{e}");
    }

    #[test]
    fn bad_files_name_the_key() {
        let rank = vec![
            t("transformer.layers.0.attention.to_q.lora_A.weight", &[4, 8]),
            t("transformer.layers.0.attention.to_q.lora_B.weight", &[8, 3]),
        ];
        let e = convert(rank, None).unwrap_err();
        assert!(e.contains("rank mismatch") && e.contains("[4, 8]") && e.contains("[8, 3]"), "{e}");
        let mut nan = vec![t("transformer.x.lora_A.weight", &[1, 2]), t("transformer.x.lora_B.weight", &[2, 1])];
        nan[1].values[1] = f32::NAN;
        let e = convert(nan, None).unwrap_err();
        assert!(e.contains("transformer.x.lora_B.weight") && e.contains("NaN"), "{e}");
        let e = convert(vec![t("model.embed.weight", &[2, 2])], None).unwrap_err();
        assert!(e.contains("model.embed.weight"), "{e}");
        let e = convert(vec![t("transformer.x.lora_A.weight", &[1, 2])], None).unwrap_err();
        assert!(e.contains("no matching up"), "{e}");
    }

    #[test]
    fn lokr_alpha_applies_to_decomposed_factors() {
        let files = vec![
            t("diffusion_model.layers.0.attention.to_q.lokr_w1", &[2, 2]),
            t("diffusion_model.layers.0.attention.to_q.lokr_w2_a", &[4, 2]),
            t("diffusion_model.layers.0.attention.to_q.lokr_w2_b", &[2, 4]),
            RawTensor { key: "diffusion_model.layers.0.attention.to_q.alpha".into(), shape: vec![], values: vec![1.0] },
        ];
        let out = convert(files, None).unwrap();
        assert_eq!(out["layers.0.attention.to_q"].factor, 0.5);
    }

    /// A rank-0 factor holds no values whatever its other side says: with a side of 2^63 + 32
    /// the LoKr product's shape wrapped to the model's and the merge indexed past the update.
    #[test]
    fn empty_or_huge_sides_are_refused() {
        let huge = (1usize << 63) + 32;
        let tensor = |key: &str, shape: Vec<usize>| RawTensor { key: key.into(), shape, values: vec![] };
        let files = vec![
            tensor("diffusion_model.layers.0.attention.to_q.lokr_w1_a", vec![huge, 0]),
            tensor("diffusion_model.layers.0.attention.to_q.lokr_w1_b", vec![0, huge]),
            t("diffusion_model.layers.0.attention.to_q.lokr_w2", &[2, 2]),
        ];
        let e = convert(files, None).unwrap_err();
        assert!(e.contains("lokr_w1_a") && e.contains("each side must be"), "{e}");
        let e = convert(
            vec![tensor("transformer.x.lora_A.weight", vec![0, 4]), t("transformer.x.lora_B.weight", &[4, 0])],
            None,
        )
        .unwrap_err();
        assert!(e.contains("each side must be"), "{e}");
    }
}
