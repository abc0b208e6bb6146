//! LoRA adapters applied at load time: a file read once ([`LoraAdapter`]), then merged into the
//! transformer's weights for a set of adapters with their scales ([`LoraSetting`]):
//! `W' = W + Σ scale_i · (alpha_i / rank_i) · B_i A_i`, in float32, stored in the package's
//! precision and handed to ONNX Runtime in place of the package's tensors. The package is
//! never written.
//!
//! - [`formats`]: the file formats (diffusers/PEFT, kohya, ComfyUI/musubi, LoKr) and their key
//!   names, turned into diffusers module names;
//! - [`merge`]: the arithmetic;
//! - [`update`]: what an adapter adds to one weight (low-rank pair, LoKr factors).
//!
//! Which ONNX initializer holds each diffusers parameter, and in which layout, is recorded by
//! the export in the manifest (`transformer.lora_parameters`, docs/package-format.md).

pub(crate) mod formats;
pub(crate) mod merge;
pub(crate) mod update;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::image_io::read_file_capped;
use crate::limits::{MAX_LORA_FILE_BYTES, MAX_SAFETENSORS_HEADER_BYTES};
use crate::package::files::sha256_hex;
use crate::package::initializers::{read_initializers, ElementType, Initializer};
use crate::package::{LoraParameter, Manifest};
use formats::{ModuleUpdate, RawTensor};
pub use merge::MergedData;

/// A LoRA (or LoKr) file, read and checked once; apply it to a pipeline with
/// [`LoraSetting`]s (`LoadOptions::loras`, `Pipeline::set_loras`). One adapter can be used by
/// several pipelines of the same model.
pub struct LoraAdapter {
    path: PathBuf,
    sha256: String,
    modules: BTreeMap<String, ModuleUpdate>,
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .field("modules", &self.modules.len())
            .finish()
    }
}

/// Reads a LoRA file whole: only a regular file (checked before opening: opening a FIFO blocks
/// until a writer comes, `/dev/zero` never ends), at most [`MAX_LORA_FILE_BYTES`]
/// ([`read_file_capped`]), whose first 8 bytes give a plausible safetensors header length.
fn read_lora_file(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::lora(path, "not a regular file (a LoRA is a .safetensors file)"));
    }
    let bytes = read_file_capped(path, MAX_LORA_FILE_BYTES).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::FileTooLarge => {
            Error::lora(path, format!("the file is {source} for a LoRA"))
        }
        other => other,
    })?;
    if let Some(prefix) = bytes.first_chunk::<8>() {
        let header = u64::from_le_bytes(*prefix);
        if !(2..=MAX_SAFETENSORS_HEADER_BYTES).contains(&header) {
            return Err(Error::lora(
                path,
                format!("not a safetensors file: its first 8 bytes give a header of {header} bytes"),
            ));
        }
    }
    Ok(bytes)
}

impl LoraAdapter {
    /// Reads a `.safetensors` LoRA file in any of the formats in [`formats`]. Every tensor is
    /// checked here (format, names, shapes, ranks, finite values), so a bad file fails now,
    /// with [`ErrorKind::Lora`](crate::error::ErrorKind::Lora) and the first bad key named;
    /// whether it fits a model is checked when it is applied.
    pub fn load(path: impl AsRef<Path>) -> Result<LoraAdapter> {
        let path = path.as_ref().to_path_buf();
        let bytes = read_lora_file(&path)?;
        let sha256 = sha256_hex(&bytes);
        let bad = |message: String| Error::lora(&path, message);
        let (_, metadata) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a readable safetensors file (truncated or another format?): {e}")))?;
        let adapter_metadata = metadata.metadata().as_ref().and_then(|m| m.get("lora_adapter_metadata").cloned());
        let file = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a readable safetensors file (truncated or another format?): {e}")))?;
        let mut tensors = Vec::new();
        for (key, view) in file.iter() {
            let values = to_f32(view.dtype(), view.data()).ok_or_else(|| {
                bad(format!("tensor {key} has element type {:?}; LoRA weights are F32, F16, BF16 or F64", view.dtype()))
            })?;
            tensors.push(RawTensor { key: key.to_string(), shape: view.shape().to_vec(), values });
        }
        drop(bytes);
        let modules = formats::convert(tensors, adapter_metadata.as_deref()).map_err(bad)?;
        Ok(LoraAdapter { path, sha256, modules })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file name (what the CLI records in PNG parameters).
    pub fn file_name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// sha256 of the file's bytes, lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The diffusers modules it changes (`layers.0.attention.to_q`, ...), sorted.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// The largest rank among its modules (0 for LoKr files with full factors only).
    pub fn max_rank(&self) -> usize {
        self.modules.values().map(|m| m.update.rank()).max().unwrap_or(0)
    }

    /// Elements of the weights it changes (`out · in` summed over its modules): one merged
    /// copy of them is what applying it holds besides the package's weights.
    pub fn target_elements(&self) -> usize {
        self.modules.values().map(|m| m.update.target_shape()).map(|(out, inn)| out.saturating_mul(inn)).sum()
    }
}

/// One adapter of an active set, with its strength: `1.0` is the adapter as trained (what
/// diffusers' `load_lora_weights` gives), `0.6` what `set_adapters(..., adapter_weights=0.6)`
/// gives.
#[derive(Debug, Clone)]
pub struct LoraSetting {
    pub adapter: Arc<LoraAdapter>,
    pub scale: f32,
}

impl LoraSetting {
    pub fn new(adapter: Arc<LoraAdapter>, scale: f32) -> LoraSetting {
        LoraSetting { adapter, scale }
    }
}

/// A key for the set (files by sha256, with scales): what caches of compiled engines are keyed
/// by. Empty for no adapters.
pub fn set_key(settings: &[LoraSetting]) -> String {
    settings.iter().map(|s| format!("{}*{:08x}", s.adapter.sha256, s.scale.to_bits())).collect::<Vec<_>>().join("+")
}

static SETS_MERGED: std::sync::Mutex<BTreeMap<PathBuf, usize>> = std::sync::Mutex::new(BTreeMap::new());

fn merge_key(graph: &Path) -> PathBuf {
    graph.canonicalize().unwrap_or_else(|_| graph.to_path_buf())
}

/// How many LoRA sets this process has merged into the weights of the transformer graph file
/// `graph` (diagnostics, as `runtime::session_count`: a ControlNet attached to a pipeline with
/// LoRAs reuses the merged set instead of merging it again).
pub fn sets_merged(graph: &Path) -> usize {
    SETS_MERGED.lock().unwrap_or_else(|p| p.into_inner()).get(&merge_key(graph)).copied().unwrap_or(0)
}

/// A merged weight ready to replace the package's initializer of that name.
#[derive(Debug, Clone)]
pub struct MergedWeight {
    pub initializer: String,
    pub dims: Vec<usize>,
    pub data: MergedData,
    /// Whether the graph keeps this initializer in its external data file (rather than
    /// inside the `.onnx` protobuf).
    pub external: bool,
    /// A weight of an editing package's Omni transformer that the transformer does not have
    /// (its SigLIP embedder and refiner): `initializer` is the Omni graph's, and only edits
    /// read it.
    pub omni_only: bool,
    /// Where the package's weight is (file, offset, length): graphs that read the
    /// transformer's weights from its files read it there ([`readers_in`]).
    pub place: Option<(PathBuf, u64, u64)>,
}

/// A LoRA file and its scale as the front ends take them: `FILE[:SCALE]`, scale 1 when absent.
/// The scale is what follows the last `:` when that parses as a number, so a path with colons
/// still works without one. [`LoraFile::load`] reads the file.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFile {
    pub path: PathBuf,
    pub scale: f32,
}

impl std::str::FromStr for LoraFile {
    type Err = Error;

    fn from_str(value: &str) -> Result<LoraFile> {
        if let Some((file, scale)) = value.rsplit_once(':') {
            if let Ok(scale) = scale.parse::<f32>() {
                if !scale.is_finite() {
                    return Err(Error::invalid(format!("LoRA scale {scale} is not finite")));
                }
                if file.is_empty() {
                    return Err(Error::invalid("no LoRA file before the scale"));
                }
                return Ok(LoraFile { path: PathBuf::from(file), scale });
            }
        }
        if value.is_empty() {
            return Err(Error::invalid("no LoRA file given"));
        }
        Ok(LoraFile { path: PathBuf::from(value), scale: 1.0 })
    }
}

impl LoraFile {
    /// Reads the adapter ([`LoraAdapter::load`]) and pairs it with the scale. A file that
    /// cannot be read stays an [`ErrorKind::Io`](crate::ErrorKind::Io) error, its message saying
    /// it is the LoRA and, for a name with a `:`, that what follows it was not taken as the scale
    /// (`a.safetensors:1,5` is the file `a.safetensors:1,5`).
    pub fn load(&self) -> Result<LoraSetting> {
        let adapter = LoraAdapter::load(&self.path).map_err(|e| match e {
            Error::Io { path, source } => {
                let hint = if path.to_string_lossy().contains(':') {
                    " (what follows its last ':' is not a number, so it was read as part of the file's name, not \
                     as the scale)"
                } else {
                    ""
                };
                let message = format!("cannot read the LoRA file: {source}{hint}");
                Error::io(path, std::io::Error::new(source.kind(), message))
            }
            other => other,
        })?;
        Ok(LoraSetting::new(Arc::new(adapter), self.scale))
    }
}

/// The transformer's Linear weights a package lets LoRAs change, with where each one is; in
/// an editing package also the Omni transformer's own ones.
pub(crate) struct Targets<'a> {
    transformer: TableGraph<'a>,
    /// The Linear weights only an editing package's Omni transformer has
    /// (`edit.omni_parameters` less the transformer's table: the SigLIP embedder and refiner).
    /// diffusers' LoRA loader targets every module of the transformer it finds, these
    /// included; text-to-image never runs them, so only edits see such keys.
    omni: Option<TableGraph<'a>>,
}

/// One graph's table of Linear weights and its initializers' places, read from the graph on
/// first use (the Omni graph's only when a LoRA has a key the transformer lacks).
struct TableGraph<'a> {
    graph: PathBuf,
    table: &'a BTreeMap<String, LoraParameter>,
    initializers: std::cell::OnceCell<BTreeMap<String, Initializer>>,
}

impl<'a> TableGraph<'a> {
    fn new(graph: PathBuf, table: &'a BTreeMap<String, LoraParameter>) -> Self {
        TableGraph { graph, table, initializers: std::cell::OnceCell::new() }
    }

    fn initializers(&self) -> Result<&BTreeMap<String, Initializer>> {
        if let Some(read) = self.initializers.get() {
            return Ok(read);
        }
        let read = read_initializers(&self.graph).map_err(|m| Error::package(&self.graph, m))?;
        Ok(self.initializers.get_or_init(|| read))
    }
}

/// Where one of a LoRA's modules lands.
struct Found<'t> {
    place: &'t LoraParameter,
    init: &'t Initializer,
    graph: &'t Path,
    out: usize,
    inn: usize,
    omni_only: bool,
}

impl<'a> Targets<'a> {
    /// Reads the tables from the manifest and the initializers' places from the graph files of
    /// the package in `dir`, for merging `loras` (a package that takes none is refused naming
    /// the first of them: the user's file, not the package's graph).
    pub fn read(dir: &Path, manifest: &'a Manifest, loras: &[LoraSetting]) -> Result<Targets<'a>> {
        let graph = Manifest::resolve(dir, &manifest.graphs.transformer.path);
        let graph = graph.as_path();
        let named = loras.first().map_or(graph, |l| l.adapter.path());
        // A LoRA is merged by adding B·A to each float weight; a block-quantized MatMulNBits
        // weight cannot take that (the sum would need re-quantizing, i.e. a new package).
        if let Some(q) = &manifest.quantization {
            return Err(Error::lora(
                named,
                format!(
                    "this package's transformer is quantized ({}): LoRAs cannot be merged into its quantized weights; \
                     use an fp32 or fp16 package of the model (or quantize after merging the LoRA)",
                    q.weights
                ),
            ));
        }
        let table = manifest.transformer.lora_parameters.as_ref().ok_or_else(|| {
            Error::lora(
                named,
                "this package was exported without transformer.lora_parameters in its manifest, so it cannot take \
                 LoRAs; re-export it with export-scripts/export.py",
            )
        })?;
        let transformer = TableGraph::new(graph.to_path_buf(), table);
        transformer.initializers()?;
        let omni_table = manifest.edit.as_ref().and_then(|e| e.omni_parameters.as_ref());
        let omni = match (omni_table, &manifest.graphs.transformer_omni) {
            (Some(table), Some(entry)) => Some(TableGraph::new(Manifest::resolve(dir, &entry.path), table)),
            _ => None,
        };
        Ok(Targets { transformer, omni })
    }

    /// Checks every adapter against the model (names and shapes, finite scales), so that an
    /// unfit set is refused before anything changes.
    pub fn check(&self, settings: &[LoraSetting]) -> Result<()> {
        for setting in settings {
            let adapter = &setting.adapter;
            if !setting.scale.is_finite() {
                return Err(Error::lora(&adapter.path, format!("scale {} is not finite", setting.scale)));
            }
            for (module, entry) in &adapter.modules {
                let Found { out, inn, .. } = self.find(adapter, module, entry)?;
                let (o, i) = entry.update.target_shape();
                if (o, i) != (out, inn) {
                    return Err(Error::lora(
                        &adapter.path,
                        format!(
                            "key {}: the LoRA changes a [{o}, {i}] weight ({}), but this model's {module}.weight is \
                             [{out}, {inn}] (a LoRA for another model?)",
                            entry.source_key,
                            entry.update.describe()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn find(&self, adapter: &LoraAdapter, module: &str, entry: &ModuleUpdate) -> Result<Found<'_>> {
        let parameter = format!("{module}.weight");
        let wrong_model = || {
            Error::lora(
                &adapter.path,
                format!(
                    "key {}: this model has no Linear weight {parameter} that LoRAs can change (a LoRA for another \
                     model?)",
                    entry.source_key
                ),
            )
        };
        // The transformer's weights first (the Omni graph reads those from the transformer's
        // files), then the Omni graph's own.
        let (place, target, omni_only) = match (self.transformer.table.get(&parameter), &self.omni) {
            (Some(place), _) => (place, &self.transformer, false),
            (None, Some(omni)) => (omni.table.get(&parameter).ok_or_else(wrong_model)?, omni, true),
            (None, None) => return Err(wrong_model()),
        };
        let graph = target.graph.as_path();
        let init = target.initializers()?.get(&place.initializer).ok_or_else(|| {
            // The package is at fault, not the LoRA: name the graph.
            Error::package(
                graph,
                format!("the manifest maps {parameter} to initializer {}, which the graph lacks", place.initializer),
            )
        })?;
        let (out, inn) = match init.dims.as_slice() {
            [a, b] if place.transposed() => (*b, *a),
            [a, b] => (*a, *b),
            other => {
                return Err(Error::package(
                    graph,
                    format!("initializer {} of {parameter} has dims {other:?}, not a matrix", place.initializer),
                ))
            }
        };
        Ok(Found { place, init, graph, out, inn, omni_only })
    }

    /// Merges the set into the base weights it touches, one weight at a time (memory: the
    /// merged weights, plus one base weight while it is read).
    pub fn merge(&self, settings: &[LoraSetting]) -> Result<Vec<MergedWeight>> {
        self.check(settings)?;
        *SETS_MERGED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(merge_key(&self.transformer.graph))
            .or_insert(0) += 1;
        let mut by_parameter: BTreeMap<&str, Vec<(&LoraAdapter, &ModuleUpdate, f32)>> = BTreeMap::new();
        for setting in settings.iter().filter(|s| s.scale != 0.0) {
            for (module, entry) in &setting.adapter.modules {
                by_parameter.entry(module.as_str()).or_default().push((
                    &setting.adapter,
                    entry,
                    setting.scale * entry.factor,
                ));
            }
        }
        let mut merged = Vec::with_capacity(by_parameter.len());
        for (module, updates) in by_parameter {
            let (adapter, first, _) = updates[0];
            let Found { place, init, graph, out, inn, omni_only } = self.find(adapter, module, first)?;
            let element = init.element_type.ok_or_else(|| {
                Error::package(graph, format!("initializer {} is not a float tensor", place.initializer))
            })?;
            let bytes = init.read_bytes().map_err(|m| Error::package(graph, m))?;
            let mut values = merge::to_f32(&bytes, element);
            drop(bytes);
            for (_, entry, factor) in &updates {
                merge::add_update(&mut values, out, inn, place.transposed(), &entry.update, *factor);
            }
            let data = merge::from_f32(values, element).map_err(|index| {
                let names: Vec<String> = updates.iter().map(|(a, _, s)| format!("{} ({s})", a.file_name())).collect();
                Error::lora(
                    &adapter.path,
                    format!(
                        "merging into {module}.weight gives a value that is not finite in {} at index {index} \
                         (adapters: {})",
                        element.name(),
                        names.join(", ")
                    ),
                )
            })?;
            let external = init.bytes.as_ref().is_some_and(|(file, _, _)| file != graph);
            merged.push(MergedWeight {
                initializer: place.initializer.clone(),
                dims: init.dims.clone(),
                data,
                external,
                omni_only,
                place: init.bytes.clone(),
            });
        }
        Ok(merged)
    }
}

/// One of the transformer's weights, for [`readers_in`]: its initializer in the transformer
/// graph, dims, and where its bytes are (file, offset, length; `None` when the graph holds it
/// in typed fields, which the exporter never writes for weights).
pub(crate) struct SharedWeight<'w> {
    pub initializer: &'w str,
    pub dims: &'w [usize],
    pub place: Option<&'w (PathBuf, u64, u64)>,
}

/// Where `graph`, a graph that reads the same weights from the transformer's files (a
/// ControlNet's combined graph, whose shared weights `export_controlnet.py` points at the
/// transformer's bytes, or the Omni transformer of an editing package: export.py's last step),
/// reads each of `weights`: per weight, every initializer of `graph` that reads the same bytes,
/// and whether it is external data of `graph` (rather than inside its protobuf). A merged weight
/// replaces all of them, so a weight the ControlNet uses too (the noise and context refiners,
/// which diffusers' ControlNet borrows from the transformer) gets the LoRA there as well, as in
/// diffusers. A weight `graph` does not read from there is a `Package` error: the LoRA would
/// silently not apply to it.
pub(crate) fn readers_in(weights: &[SharedWeight<'_>], graph: &Path) -> Result<Vec<Vec<(String, bool)>>> {
    let theirs = read_initializers(graph).map_err(|m| Error::package(graph, m))?;
    let canonical = |file: &Path| std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    // (file, offset, length) -> the initializers of `graph` that read those bytes.
    type Readers<'a> = BTreeMap<(PathBuf, u64, u64), Vec<(&'a String, &'a Initializer)>>;
    let mut readers: Readers = BTreeMap::new();
    for (name, init) in &theirs {
        if let Some((file, offset, length)) = &init.bytes {
            readers.entry((canonical(file), *offset, *length)).or_default().push((name, init));
        }
    }
    let own_file = canonical(graph);
    let mut out = Vec::with_capacity(weights.len());
    for &SharedWeight { initializer, dims, place } in weights {
        let place = place.map(|(f, o, l)| (canonical(f), *o, *l));
        let found = place.as_ref().and_then(|p| readers.get(p)).map(Vec::as_slice).unwrap_or_default();
        if found.is_empty() {
            return Err(Error::package(
                graph,
                format!(
                    "this graph does not read the transformer's weight {initializer} from the transformer's file, \
                     so a LoRA cannot change it there; re-export it (a ControlNet with export_controlnet.py, an \
                     editing package with export.py)"
                ),
            ));
        }
        let mut names = Vec::with_capacity(found.len());
        for (name, init) in found {
            if init.dims != dims {
                return Err(Error::package(
                    graph,
                    format!(
                        "initializer {name} reads the bytes of the transformer's {initializer} but has dims {:?}, \
                         not {dims:?}",
                        init.dims
                    ),
                ));
            }
            let external = init.bytes.as_ref().is_some_and(|(file, _, _)| canonical(file) != own_file);
            names.push(((*name).clone(), external));
        }
        out.push(names);
    }
    Ok(out)
}

/// Little-endian safetensors data to float32.
fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    let values = match dtype {
        Dtype::F32 => merge::to_f32(data, ElementType::Float32),
        Dtype::F16 => merge::to_f32(data, ElementType::Float16),
        Dtype::BF16 => merge::to_f32(data, ElementType::BFloat16),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        _ => return None,
    };
    Some(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// The merged weights land on the combined graph's initializers that read the same bytes,
    /// every one of them; a graph that reads none of them refuses the set by name.
    #[test]
    fn lora_files_parse_with_and_without_a_scale() {
        let parse = |s: &str| s.parse::<LoraFile>();
        assert_eq!(parse("a.safetensors").unwrap(), LoraFile { path: "a.safetensors".into(), scale: 1.0 });
        assert_eq!(parse("dir/a.safetensors:0.7").unwrap(), LoraFile { path: "dir/a.safetensors".into(), scale: 0.7 });
        assert_eq!(parse("c:/x:y.safetensors").unwrap().path, PathBuf::from("c:/x:y.safetensors"));
        assert_eq!(parse("a.safetensors:-1.5").unwrap().scale, -1.5);
        for bad in ["", ":0.5", "a.safetensors:inf", "a.safetensors:NaN"] {
            assert_eq!(parse(bad).unwrap_err().kind(), ErrorKind::InvalidRequest, "{bad:?}");
        }
        // A file that is not there: an I/O error that says it is the LoRA, and with a ':' in
        // the name, that what follows it was not the scale.
        let missing = std::env::temp_dir().join(format!("zimage-no-lora-{}/a.safetensors", std::process::id()));
        let e = parse(&format!("{}:1,5", missing.display())).unwrap().load().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().starts_with(&format!("{}:1,5: cannot read the LoRA file: ", missing.display())), "{e}");
        assert!(e.to_string().contains("not as the scale"), "{e}");
        let e = parse(&missing.display().to_string()).unwrap().load().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("cannot read the LoRA file") && !e.to_string().contains("scale"), "{e}");
    }

    #[test]
    fn retargeting_follows_the_shared_bytes_and_refuses_a_graph_without_them() {
        let dir = repo().join("models/tiny-zimage-control");
        let manifest = Manifest::load(&dir, false).unwrap();
        let adapter = LoraAdapter::load(repo().join("tests/golden/tiny-zimage/loras/peft.safetensors")).unwrap();
        let set = [LoraSetting::new(Arc::new(adapter), 1.0)];
        let targets = Targets::read(&dir, &manifest, &set).unwrap();
        let merged = targets.merge(&set).unwrap();
        assert_eq!(merged.len(), 28);

        let combined = dir.join("controlnet_union-v1.onnx");
        let weights: Vec<SharedWeight> = merged
            .iter()
            .map(|m| SharedWeight { initializer: &m.initializer, dims: &m.dims, place: m.place.as_ref() })
            .collect();
        let readers = readers_in(&weights, &combined).unwrap();
        assert_eq!(readers.len(), merged.len());
        let theirs = read_initializers(&combined).unwrap();
        for (weight, names) in merged.iter().zip(&readers) {
            assert!(!names.is_empty(), "{}", weight.initializer);
            for (name, external) in names {
                let init = &theirs[name];
                assert_eq!(init.dims, weight.dims);
                assert!(external, "{name}: shared weights are external data of the combined graph");
                assert_eq!(
                    init.bytes,
                    targets.transformer.initializers().unwrap()[&weight.initializer].bytes,
                    "{name} reads other bytes"
                );
            }
        }

        let other = repo().join("models/tiny-zimage-alt/transformer.onnx");
        let err = readers_in(&weights, &other).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Package);
        assert!(err.to_string().contains("does not read the transformer's weight"), "{err}");
    }
}
