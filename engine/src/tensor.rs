//! Host tensors as they travel between the protocol layer and the devices.
//!
//! Fixed-size element types are kept as little-endian bytes in row-major order, which is both the
//! binary wire format of the Open Inference Protocol and what tract and candle take, so a request
//! body becomes a device input with one copy. `BYTES` tensors hold one byte string per element.

use serde::{Deserialize, Serialize};

use crate::EngineError;

/// Element types of the Open Inference Protocol (§8 of the digest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::F16,
        DataType::BF16,
        DataType::F32,
        DataType::F64,
        DataType::Bytes,
    ];

    /// The protocol's name for this type (`"FP32"`, `"INT64"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::BF16 => "BF16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a protocol type name; case-sensitive as the protocol says.
    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Bytes per element, `None` for `BYTES`.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 | DataType::BF16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The elements of a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// Little-endian, row-major elements of a fixed-size type.
    Raw(Vec<u8>),
    /// One byte string per element (`BYTES`).
    Bytes(Vec<Vec<u8>>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// Number of elements of a shape, or `None` on overflow.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

macro_rules! typed_constructors {
    ($($fn_name:ident, $as_name:ident, $t:ty, $dt:expr;)*) => {
        $(
            /// Builds a tensor from typed elements (row-major).
            pub fn $fn_name(shape: Vec<usize>, values: &[$t]) -> Result<Tensor, EngineError> {
                let mut raw = Vec::with_capacity(values.len() * std::mem::size_of::<$t>());
                for v in values {
                    raw.extend_from_slice(&v.to_le_bytes());
                }
                Tensor::from_raw($dt, shape, raw)
            }

            /// The elements as a typed vector; an error if the type differs.
            pub fn $as_name(&self) -> Result<Vec<$t>, EngineError> {
                self.expect_dtype($dt)?;
                let raw = self.raw()?;
                const N: usize = std::mem::size_of::<$t>();
                Ok(raw
                    .chunks_exact(N)
                    .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk of element size")))
                    .collect())
            }
        )*
    };
}

impl Tensor {
    /// A tensor of a fixed-size type from little-endian bytes; checks the byte count.
    pub fn from_raw(dtype: DataType, shape: Vec<usize>, raw: Vec<u8>) -> Result<Tensor, EngineError> {
        let size = dtype
            .size()
            .ok_or_else(|| EngineError::InvalidInput("BYTES tensors are built with Tensor::from_bytes".into()))?;
        let n = numel(&shape).ok_or_else(|| EngineError::InvalidInput(format!("shape {shape:?} overflows")))?;
        if n.checked_mul(size) != Some(raw.len()) {
            return Err(EngineError::InvalidInput(format!(
                "{dtype} tensor of shape {shape:?} needs {} bytes, got {}",
                n.saturating_mul(size),
                raw.len()
            )));
        }
        Ok(Tensor { dtype, shape, data: TensorData::Raw(raw) })
    }

    /// A `BYTES` tensor; checks the element count.
    pub fn from_bytes(shape: Vec<usize>, values: Vec<Vec<u8>>) -> Result<Tensor, EngineError> {
        if numel(&shape) != Some(values.len()) {
            return Err(EngineError::InvalidInput(format!(
                "BYTES tensor of shape {shape:?} needs {} elements, got {}",
                numel(&shape).unwrap_or(usize::MAX),
                values.len()
            )));
        }
        Ok(Tensor { dtype: DataType::Bytes, shape, data: TensorData::Bytes(values) })
    }

    typed_constructors! {
        from_f32, to_f32, f32, DataType::F32;
        from_f64, to_f64, f64, DataType::F64;
        from_i64, to_i64, i64, DataType::I64;
        from_i32, to_i32, i32, DataType::I32;
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape).unwrap_or(0)
    }

    /// Rows along the batch dimension (dim 0); 1 for scalars.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    pub fn raw(&self) -> Result<&[u8], EngineError> {
        match &self.data {
            TensorData::Raw(r) => Ok(r),
            TensorData::Bytes(_) => Err(EngineError::InvalidInput("expected a fixed-size tensor, got BYTES".into())),
        }
    }

    fn expect_dtype(&self, dtype: DataType) -> Result<(), EngineError> {
        if self.dtype != dtype {
            return Err(EngineError::InvalidInput(format!("expected {dtype}, got {}", self.dtype)));
        }
        Ok(())
    }

    /// Concatenates tensors along dim 0. Trailing dimensions that differ are padded with zeros to
    /// the largest (pad to the longest in the batch) when `pad` is true, and refused otherwise.
    pub fn concat(parts: &[&Tensor], pad: bool) -> Result<Tensor, EngineError> {
        let first = parts.first().ok_or_else(|| EngineError::InvalidInput("nothing to concatenate".into()))?;
        let rank = first.shape.len();
        if rank == 0 {
            return Err(EngineError::InvalidInput("cannot batch scalar tensors".into()));
        }
        let mut trailing = first.shape[1..].to_vec();
        let mut rows = 0usize;
        for p in parts {
            if p.dtype != first.dtype || p.shape.len() != rank {
                return Err(EngineError::InvalidInput(format!(
                    "cannot batch {} {:?} with {} {:?}",
                    first.dtype, first.shape, p.dtype, p.shape
                )));
            }
            for (t, &d) in trailing.iter_mut().zip(&p.shape[1..]) {
                if *t != d {
                    if !pad {
                        return Err(EngineError::InvalidInput(format!(
                            "cannot batch shapes {:?} and {:?} without padding",
                            first.shape, p.shape
                        )));
                    }
                    *t = (*t).max(d);
                }
            }
            rows += p.shape[0];
        }
        let mut shape = Vec::with_capacity(rank);
        shape.push(rows);
        shape.extend_from_slice(&trailing);
        match first.data {
            TensorData::Raw(_) => {
                let size = first.dtype.size().expect("raw tensors have a fixed size");
                let pieces: Vec<(&[u8], &[usize])> =
                    parts.iter().map(|p| Ok((p.raw()?, &p.shape[..]))).collect::<Result<_, EngineError>>()?;
                let raw = algolink_kernels::pad_concat(&pieces, size, &trailing);
                Ok(Tensor { dtype: first.dtype, shape, data: TensorData::Raw(raw) })
            }
            TensorData::Bytes(_) => {
                if parts.iter().any(|p| p.shape[1..] != trailing[..]) {
                    return Err(EngineError::InvalidInput("BYTES tensors of different shapes cannot be padded".into()));
                }
                let values = parts
                    .iter()
                    .flat_map(|p| match &p.data {
                        TensorData::Bytes(b) => b.clone(),
                        TensorData::Raw(_) => Vec::new(),
                    })
                    .collect();
                Tensor::from_bytes(shape, values)
            }
        }
    }

    /// Splits along dim 0 into pieces of the given row counts (which must add up).
    pub fn split_rows(self, rows: &[usize]) -> Result<Vec<Tensor>, EngineError> {
        let total: usize = rows.iter().sum();
        if self.shape.first() != Some(&total) {
            return Err(EngineError::Execution(format!(
                "output of shape {:?} does not have the batch's {total} rows along dim 0",
                self.shape
            )));
        }
        if rows.len() == 1 {
            return Ok(vec![self]);
        }
        let row_elems = numel(&self.shape[1..]).unwrap_or(0);
        let mut out = Vec::with_capacity(rows.len());
        let shape_of = |r: usize| {
            let mut s = self.shape.clone();
            s[0] = r;
            s
        };
        match &self.data {
            TensorData::Raw(raw) => {
                let row_bytes = row_elems * self.dtype.size().expect("raw tensors have a fixed size");
                let mut at = 0;
                for &r in rows {
                    let end = at + r * row_bytes;
                    out.push(Tensor {
                        dtype: self.dtype,
                        shape: shape_of(r),
                        data: TensorData::Raw(raw[at..end].to_vec()),
                    });
                    at = end;
                }
            }
            TensorData::Bytes(values) => {
                let mut at = 0;
                for &r in rows {
                    let end = at + r * row_elems;
                    out.push(Tensor {
                        dtype: self.dtype,
                        shape: shape_of(r),
                        data: TensorData::Bytes(values[at..end].to_vec()),
                    });
                    at = end;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DataType::parse("fp32"), None, "names are case-sensitive");
    }

    #[test]
    fn raw_size_is_checked() {
        assert!(Tensor::from_raw(DataType::F32, vec![2, 2], vec![0; 15]).is_err());
        assert!(Tensor::from_raw(DataType::F32, vec![2, 2], vec![0; 16]).is_ok());
        assert!(Tensor::from_raw(DataType::F32, vec![usize::MAX, 4], vec![]).is_err());
    }

    #[test]
    fn concat_then_split_is_identity() {
        let a = Tensor::from_f32(vec![1, 3], &[1., 2., 3.]).unwrap();
        let b = Tensor::from_f32(vec![2, 3], &[4., 5., 6., 7., 8., 9.]).unwrap();
        let batch = Tensor::concat(&[&a, &b], false).unwrap();
        assert_eq!(batch.shape, vec![3, 3]);
        let parts = batch.split_rows(&[1, 2]).unwrap();
        assert_eq!(parts, vec![a, b]);
    }

    #[test]
    fn concat_pads_to_longest_only_when_allowed() {
        let a = Tensor::from_i64(vec![1, 2], &[1, 2]).unwrap();
        let b = Tensor::from_i64(vec![1, 3], &[3, 4, 5]).unwrap();
        assert!(Tensor::concat(&[&a, &b], false).is_err());
        let batch = Tensor::concat(&[&a, &b], true).unwrap();
        assert_eq!(batch.shape, vec![2, 3]);
        assert_eq!(batch.to_i64().unwrap(), vec![1, 2, 0, 3, 4, 5]);
    }

    #[test]
    fn split_checks_rows() {
        let a = Tensor::from_f32(vec![2, 1], &[1., 2.]).unwrap();
        assert!(a.split_rows(&[1, 2]).is_err());
    }
}
