//! Running the enhancer's `text_decoder` graph one chunk at a time with a KV cache.
//!
//! The cache stays in ONNX Runtime values: each call's `present.*` outputs become the next
//! call's `past_key_values.*` inputs without being copied into Rust arrays. Batch size is 1.

use std::borrow::Cow;

use ndarray::Array2;
use ort::value::{DynValue, Tensor, TensorRef};

use crate::error::{Error, Result};
use crate::package::enhancer::EnhancerInfo;
use crate::package::graph::{GraphEntry, GraphKind};
use crate::runtime::device::Device;
use crate::runtime::graph::{Graph, Inputs};
use crate::runtime::run_context::RunContext;

const STAGE: &str = "text_decoder";
const INPUT_IDS: &str = "input_ids";
const ATTENTION_MASK: &str = "attention_mask";
const POSITION_IDS: &str = "position_ids";
const LOGITS: &str = "logits";

/// Graph inputs or outputs by name and element type.
type Interface = Vec<(String, &'static str)>;

/// Inputs and outputs `text_decoder` must have, in order: ids, mask and positions, then a key
/// and a value per layer; logits, then the grown keys and values.
fn interface(info: &EnhancerInfo) -> (Interface, Interface) {
    let mut inputs = vec![
        (INPUT_IDS.to_string(), "int64"),
        (ATTENTION_MASK.to_string(), "int64"),
        (POSITION_IDS.to_string(), "int64"),
    ];
    let mut outputs = vec![(LOGITS.to_string(), "float32")];
    for i in 0..info.num_layers {
        for kv in ["key", "value"] {
            inputs.push((format!("past_key_values.{i}.{kv}"), "float32"));
            outputs.push((format!("present.{i}.{kv}"), "float32"));
        }
    }
    (inputs, outputs)
}

/// Checks that the package's decoder declares the interface [`Decoder`] drives.
pub(crate) fn check_interface(info: &EnhancerInfo, graph: &GraphEntry) -> std::result::Result<(), String> {
    let (inputs, outputs) = interface(info);
    let inputs: Vec<(&str, &str)> = inputs.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let outputs: Vec<(&str, &str)> = outputs.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    graph.check_interface(GraphKind::TextDecoder, &inputs, &outputs)
}

pub(crate) struct Decoder {
    pub device: Device,
    info: EnhancerInfo,
    graph: Graph,
    cache_input_names: Vec<String>,
    cache_output_names: Vec<String>,
}

/// Keys and values of every layer for the tokens fed so far.
pub(crate) struct KvCache {
    values: Vec<DynValue>, // past_key_values.{i}.key, .value, in input order
    len: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Decoder {
    pub fn new(graph: Graph, device: Device, info: EnhancerInfo) -> Self {
        let (inputs, outputs) = interface(&info);
        Decoder {
            device,
            info,
            graph,
            cache_input_names: inputs.into_iter().skip(3).map(|(n, _)| n).collect(),
            cache_output_names: outputs.into_iter().skip(1).map(|(n, _)| n).collect(),
        }
    }

    /// A cache holding nothing (past length 0).
    pub fn empty_cache(&self) -> Result<KvCache> {
        let shape = [1usize, self.info.num_kv_heads, 0, self.info.head_dim];
        let values = (0..2 * self.info.num_layers)
            .map(|_| {
                Tensor::<f32>::from_array((shape, Vec::<f32>::new()))
                    .map(|t| t.into_dyn())
                    .map_err(|e| Error::inference(STAGE, format!("empty cache: {e}")).caused_by(e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { values, len: 0 })
    }

    /// Feeds `ids` after what `cache` holds in calls of at most `chunk` tokens, and returns the
    /// logits for the token after the last of them. The decoder's attention holds a
    /// `heads x new x total` score matrix per call: in one call a prompt of S tokens needs
    /// S x S per head (Qwen3-4B, 32 heads: 12.8 GB at 10,000 tokens), in chunks `chunk` x S.
    pub fn prefill(&self, ids: &[u32], cache: &mut KvCache, context: &RunContext, chunk: usize) -> Result<Vec<f32>> {
        let mut logits = Err(Error::invalid("nothing to feed the decoder"));
        for part in ids.chunks(chunk.max(1)) {
            logits = Ok(self.step(part, cache, context)?);
        }
        logits
    }

    /// Feeds `ids` after what `cache` holds, grows the cache, and returns the logits for the
    /// token after the last of `ids`.
    pub fn step(&self, ids: &[u32], cache: &mut KvCache, context: &RunContext) -> Result<Vec<f32>> {
        let n = ids.len();
        let total = cache.len + n;
        if n == 0 {
            return Err(Error::invalid("nothing to feed the decoder"));
        }
        if total > self.info.max_positions {
            return Err(Error::invalid(format!(
                "prompt and answer need {total} tokens; this model handles {}",
                self.info.max_positions
            )));
        }
        let err = |e: ort::Error| Error::ort(STAGE, e);
        let input_ids = Array2::from_shape_vec((1, n), ids.iter().map(|&i| i as i64).collect()).expect("shape");
        let mask = Array2::<i64>::ones((1, total));
        let positions = Array2::from_shape_vec((1, n), (cache.len as i64..total as i64).collect()).expect("shape");
        let mut inputs: Inputs<'_> = vec![
            (INPUT_IDS.into(), TensorRef::from_array_view(&input_ids).map_err(err)?.into()),
            (ATTENTION_MASK.into(), TensorRef::from_array_view(&mask).map_err(err)?.into()),
            (POSITION_IDS.into(), TensorRef::from_array_view(&positions).map_err(err)?.into()),
        ];
        for (name, value) in self.cache_input_names.iter().zip(&cache.values) {
            inputs.push((Cow::Borrowed(name.as_str()), value.into()));
        }
        let (logits, presents) = self.graph.run_then(inputs, context, false, |mut outputs| {
            let logits = {
                let value = outputs.get(LOGITS).ok_or_else(|| self.graph.failed("no output logits"))?;
                let (shape, data) = value.try_extract_tensor::<f32>().map_err(err)?;
                if shape.len() != 2 || shape[0] != 1 || shape[1] as usize != self.info.vocab_size {
                    return Err(self.graph.failed(format!("logits have shape {shape:?}")));
                }
                data.to_vec()
            };
            let mut presents = Vec::with_capacity(self.cache_output_names.len());
            for name in &self.cache_output_names {
                presents.push(outputs.remove(name).ok_or_else(|| self.graph.failed(format!("no output {name}")))?);
            }
            Ok((logits, presents))
        })?;
        cache.values = presents;
        cache.len = total;
        // NaN or +inf has no probability (a sampler would drop +inf, greedy pick it), and
        // logits all -inf leave nothing to choose: the decoder's arithmetic failed.
        if logits.iter().any(|v| v.is_nan() || *v == f32::INFINITY) || logits.iter().all(|v| *v == f32::NEG_INFINITY) {
            return Err(self.graph.failed("the decoder produced NaN, infinite or only -inf logits"));
        }
        Ok(logits)
    }
}
