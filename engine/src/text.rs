//! Text in: a Hugging Face tokenizer (`tokenizer.json`, read by the `tokenizers` crate) in front
//! of a model that takes token ids, so that clients send strings.
//!
//! [`TextModel`] wraps any model whose inputs are among `input_ids`, `attention_mask` and
//! `token_type_ids` (candle's `bert`, or an ONNX export of a BERT-style encoder). Its signature
//! takes one `text` BYTES tensor of shape [N] (UTF-8 strings) and returns the inner model's
//! outputs. Tokenising happens in [`Model::preprocess`], on the request's side of the scheduler,
//! never on the executor; each request's ids are padded to its own longest text, and the batcher
//! pads the batch to its longest request (what `pad_to_longest` allows).
//!
//! The tokenizer file's own padding is dropped (`all-MiniLM-L6-v2` ships a fixed 128, which would
//! make every short sentence cost 128 tokens), and truncation follows sentence-transformers:
//! `max_seq_length` from `sentence_bert_config.json` (or `model_max_length` from
//! `tokenizer_config.json`, where sentence-transformers 6 keeps it), else the tokenizer file's
//! truncation, else 512, never beyond the model's `max_position_embeddings`.

use std::sync::Arc;

use tokenizers::{Tokenizer, TruncationParams};

use crate::model::{Model, Signature, TensorSpec};
use crate::{DataType, EngineError, Tensor, TensorData};

/// The name of the strings input of a text model.
pub const TEXT_INPUT: &str = "text";

/// Which tokenizer output feeds an inner model input.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Feed {
    Ids,
    Mask,
    TypeIds,
}

pub struct TextModel {
    tokenizer: Tokenizer,
    inner: Arc<dyn Model>,
    /// Per inner input, in its order: what feeds it and in which integer type.
    feeds: Vec<(Feed, DataType)>,
    max_length: usize,
    signature: Signature,
}

impl TextModel {
    /// `max_length`: the truncation length sentence-transformers uses, if the files name one;
    /// `max_positions`: the longest sequence the model accepts, if known.
    pub fn new(
        tokenizer_json: &[u8],
        inner: Arc<dyn Model>,
        max_length: Option<usize>,
        max_positions: Option<usize>,
    ) -> Result<TextModel, EngineError> {
        let mut tokenizer = Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| EngineError::InvalidModel(format!("tokenizer.json: {e}")))?;
        let feeds = inner
            .signature()
            .inputs
            .iter()
            .map(|spec| {
                let feed = match spec.name.as_str() {
                    "input_ids" => Feed::Ids,
                    "attention_mask" => Feed::Mask,
                    "token_type_ids" => Feed::TypeIds,
                    other => {
                        return Err(EngineError::Unsupported(format!(
                            "model input {other:?} is not one a tokenizer produces (input_ids, attention_mask, \
                             token_type_ids); push the model without tokenizer.json to send tensors"
                        )));
                    }
                };
                if !matches!(spec.datatype, DataType::I64 | DataType::I32) || spec.shape.len() != 2 {
                    return Err(EngineError::Unsupported(format!(
                        "model input {:?} is {} {:?}; token inputs must be INT64 or INT32 [batch, sequence]",
                        spec.name, spec.datatype, spec.shape
                    )));
                }
                Ok((feed, spec.datatype))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !feeds.iter().any(|(f, _)| *f == Feed::Ids) {
            return Err(EngineError::Unsupported("a text model needs an `input_ids` input".into()));
        }
        let from_file = tokenizer.get_truncation().map(|t| t.max_length);
        let max_length = max_length.or(from_file).unwrap_or(512).min(max_positions.unwrap_or(usize::MAX)).max(2);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| EngineError::InvalidModel(format!("tokenizer truncation: {e}")))?;
        let inner_sig = inner.signature();
        let signature = Signature {
            platform: inner_sig.platform.clone(),
            inputs: vec![TensorSpec { name: TEXT_INPUT.into(), datatype: DataType::Bytes, shape: vec![-1] }],
            outputs: inner_sig.outputs.clone(),
            pad_to_longest: inner_sig.pad_to_longest,
        };
        Ok(TextModel { tokenizer, inner, feeds, max_length, signature })
    }

    /// The length texts are truncated to, in tokens (special tokens included).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenises strings into the inner model's inputs, [N, longest] each, zero-padded.
    pub fn encode(&self, texts: &[Vec<u8>]) -> Result<Vec<Tensor>, EngineError> {
        let mut encodings = Vec::with_capacity(texts.len());
        for (i, t) in texts.iter().enumerate() {
            let s = std::str::from_utf8(t)
                .map_err(|e| EngineError::InvalidInput(format!("input \"text\" element {i} is not UTF-8: {e}")))?;
            let enc = self
                .tokenizer
                .encode_fast(s, true)
                .map_err(|e| EngineError::InvalidInput(format!("input \"text\" element {i}: {e}")))?;
            encodings.push(enc);
        }
        let longest = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let rows = encodings.len();
        self.feeds
            .iter()
            .map(|&(feed, dtype)| {
                let mut values = vec![0i64; rows * longest];
                for (row, enc) in values.chunks_exact_mut(longest.max(1)).zip(&encodings) {
                    let src = match feed {
                        Feed::Ids => enc.get_ids(),
                        Feed::Mask => enc.get_attention_mask(),
                        Feed::TypeIds => enc.get_type_ids(),
                    };
                    for (d, &s) in row.iter_mut().zip(src) {
                        *d = i64::from(s);
                    }
                }
                let shape = vec![rows, longest];
                match dtype {
                    DataType::I32 => Tensor::from_i32(shape, &values.iter().map(|&v| v as i32).collect::<Vec<_>>()),
                    _ => Tensor::from_i64(shape, &values),
                }
            })
            .collect()
    }
}

impl Model for TextModel {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn device(&self) -> crate::Device {
        self.inner.device()
    }

    fn prepare(&self, max_batch_size: usize) {
        self.inner.prepare(max_batch_size)
    }

    fn preprocess(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        match inputs.into_iter().next().map(|t| t.data) {
            Some(TensorData::Bytes(texts)) => self.encode(&texts),
            _ => Err(EngineError::InvalidInput(format!("expected one BYTES input {TEXT_INPUT:?}"))),
        }
    }

    fn preprocess_cost(&self, inputs: &[Tensor]) -> usize {
        match inputs.first().map(|t| &t.data) {
            Some(TensorData::Bytes(texts)) => texts.iter().map(Vec::len).sum(),
            _ => 0,
        }
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        self.inner.run(inputs)
    }

    fn concurrent(&self) -> bool {
        self.inner.concurrent()
    }

    fn measure_lanes(&self, rows: usize) {
        self.inner.measure_lanes(rows)
    }

    fn side_by_side(&self) -> bool {
        self.inner.side_by_side()
    }

    fn run_in_lane(&self, inputs: Vec<Tensor>, lane: usize, lanes: usize) -> Result<Vec<Tensor>, EngineError> {
        self.inner.run_in_lane(inputs, lane, lanes)
    }
}
