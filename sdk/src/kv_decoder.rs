//! Running the enhancer's `text_decoder` graph one chunk at a time with a KV cache.
//!
//! The cache stays in ONNX Runtime values: each call's `present.*` outputs become the next
//! call's `past_key_values.*` inputs without being copied into Rust arrays. Batch size is 1.

use std::borrow::Cow;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ndarray::Array2;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorRef};

use crate::cancel::RunControl;
use crate::error::{Error, Result};
use crate::manifest::EnhancerInfo;
use crate::runtime::Device;

const STAGE: &str = "text_decoder";

pub(crate) struct Decoder {
    pub device: Device,
    info: EnhancerInfo,
    // `Session::run` takes `&mut self`: concurrent enhancements take turns per step.
    session: Mutex<Session>,
    input_names: Vec<String>,
    output_names: Vec<String>,
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
    pub fn new(session: Session, device: Device, info: EnhancerInfo) -> Self {
        let (inputs, outputs) = info.decoder_io();
        Decoder {
            device,
            info,
            session: Mutex::new(session),
            input_names: inputs.into_iter().map(|(n, _)| n).collect(),
            output_names: outputs.into_iter().map(|(n, _)| n).collect(),
        }
    }

    /// A cache holding nothing (past length 0).
    pub fn empty_cache(&self) -> Result<KvCache> {
        let shape = [1usize, self.info.num_kv_heads, 0, self.info.head_dim];
        let values = (0..2 * self.info.num_layers)
            .map(|_| {
                Tensor::<f32>::from_array((shape, Vec::<f32>::new()))
                    .map(|t| t.into_dyn())
                    .map_err(|e| Error::inference(STAGE, format!("empty cache: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { values, len: 0 })
    }

    /// Feeds `ids` after what `cache` holds, grows the cache, and returns the logits for the
    /// token after the last of `ids`.
    pub fn step(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        control: &RunControl,
        ort_time: &mut Duration,
    ) -> Result<Vec<f32>> {
        control.check()?;
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
        let err = |e: ort::Error| Error::inference(STAGE, e);
        let input_ids = Array2::from_shape_vec((1, n), ids.iter().map(|&i| i as i64).collect()).expect("shape");
        let mask = Array2::<i64>::ones((1, total));
        let positions = Array2::from_shape_vec((1, n), (cache.len as i64..total as i64).collect()).expect("shape");
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            (Cow::Borrowed(self.input_names[0].as_str()), TensorRef::from_array_view(&input_ids).map_err(err)?.into()),
            (Cow::Borrowed(self.input_names[1].as_str()), TensorRef::from_array_view(&mask).map_err(err)?.into()),
            (Cow::Borrowed(self.input_names[2].as_str()), TensorRef::from_array_view(&positions).map_err(err)?.into()),
        ];
        for (name, value) in self.input_names[3..].iter().zip(&cache.values) {
            inputs.push((Cow::Borrowed(name.as_str()), value.into()));
        }
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        let result = session.run_with_options(inputs, control.run_options(false));
        *ort_time += start.elapsed();
        if control.is_cancelled() {
            return Err(Error::Cancelled); // a terminated run reports a generic failure
        }
        let mut outputs = result.map_err(err)?;
        let logits = {
            let (shape, data) = outputs["logits"].try_extract_tensor::<f32>().map_err(err)?;
            if shape.len() != 2 || shape[0] != 1 || shape[1] as usize != self.info.vocab_size {
                return Err(Error::inference(STAGE, format!("logits have shape {shape:?}")));
            }
            data.to_vec()
        };
        let mut presents = Vec::with_capacity(cache.values.len());
        for name in &self.output_names[1..] {
            presents.push(outputs.remove(name).ok_or_else(|| Error::inference(STAGE, format!("no output {name}")))?);
        }
        cache.values = presents;
        cache.len = total;
        if logits.iter().any(|v| v.is_nan()) {
            return Err(Error::inference(STAGE, "the decoder produced NaN logits"));
        }
        Ok(logits)
    }
}
