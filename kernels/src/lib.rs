//! Data-movement kernels of the engine.
//!
//! Each kernel has a plain CPU implementation here, tested against a naive reference; CUDA
//! versions come behind the `cuda` feature only where a profile shows the CPU one costs time.

/// Gathers row-major tensors into one batch buffer along dim 0, zero-padding every trailing
/// dimension to `trailing` (pad to the longest in the batch).
///
/// Each part is `(bytes, shape)` with `shape[0]` rows and `shape[1..]` no larger than `trailing`
/// dim by dim; `elem` is the element size in bytes. Parts whose trailing shape already matches are
/// copied with one `memcpy`.
pub fn pad_concat(parts: &[(&[u8], &[usize])], elem: usize, trailing: &[usize]) -> Vec<u8> {
    let row_elems: usize = trailing.iter().product();
    let rows: usize = parts.iter().map(|(_, s)| s[0]).sum();
    let mut out = vec![0u8; rows * row_elems * elem];
    let mut row_at = 0usize;
    for (bytes, shape) in parts {
        let dst = &mut out[row_at * row_elems * elem..];
        if &shape[1..] == trailing {
            dst[..bytes.len()].copy_from_slice(bytes);
        } else {
            copy_padded(bytes, shape, dst, trailing, elem);
        }
        row_at += shape[0];
    }
    out
}

/// Copies `src` (shape `shape`) into the zeroed `dst` laid out as `[shape[0]] + trailing`.
fn copy_padded(src: &[u8], shape: &[usize], dst: &mut [u8], trailing: &[usize], elem: usize) {
    let rank = shape.len();
    let last = shape[rank - 1] * elem;
    if last == 0 {
        return;
    }
    // Strides (in elements) of the destination for dims 0..rank.
    let mut dst_strides = vec![1usize; rank];
    for d in (0..rank - 1).rev() {
        dst_strides[d] = dst_strides[d + 1] * trailing[d];
    }
    // Iterate over every index of the source's leading rank-1 dims, copying one innermost run.
    let outer: usize = shape[..rank - 1].iter().product();
    let mut index = vec![0usize; rank - 1];
    for run in 0..outer {
        let dst_off: usize = index.iter().zip(&dst_strides).map(|(i, s)| i * s).sum::<usize>() * elem;
        dst[dst_off..dst_off + last].copy_from_slice(&src[run * last..(run + 1) * last]);
        for d in (0..rank - 1).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part: its elements and its shape.
    type Part = (Vec<u32>, Vec<usize>);

    /// Naive reference: element by element with explicit multi-indices.
    fn reference(parts: &[Part], trailing: &[usize]) -> Vec<u32> {
        let row: usize = trailing.iter().product();
        let mut out = Vec::new();
        for (data, shape) in parts {
            let mut block = vec![0u32; shape[0] * row];
            for (flat, v) in data.iter().enumerate() {
                let mut rem = flat;
                let mut idx = vec![0; shape.len()];
                for d in (0..shape.len()).rev() {
                    idx[d] = rem % shape[d];
                    rem /= shape[d];
                }
                let mut off = idx[0];
                for d in 1..shape.len() {
                    off = off * trailing[d - 1] + idx[d];
                }
                block[off] = *v;
            }
            out.extend(block);
        }
        out
    }

    fn to_bytes(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn matches_reference_on_mixed_shapes() {
        let cases: Vec<(Vec<Part>, Vec<usize>)> = vec![
            (vec![((1..=4).collect(), vec![2, 2]), ((5..=10).collect(), vec![2, 3])], vec![3]),
            (vec![((1..=12).collect(), vec![1, 3, 4]), ((1..=4).collect(), vec![2, 1, 2])], vec![3, 4]),
            (vec![((1..=6).collect(), vec![3, 2]), ((7..=8).collect(), vec![1, 2])], vec![2]),
            (vec![(vec![], vec![2, 0]), ((1..=2).collect(), vec![1, 2])], vec![2]),
        ];
        for (parts, trailing) in cases {
            let bytes: Vec<Vec<u8>> = parts.iter().map(|(d, _)| to_bytes(d)).collect();
            let inputs: Vec<(&[u8], &[usize])> = bytes.iter().zip(&parts).map(|(b, (_, s))| (&b[..], &s[..])).collect();
            let got = pad_concat(&inputs, 4, &trailing);
            assert_eq!(got, to_bytes(&reference(&parts, &trailing)), "trailing {trailing:?}");
        }
    }
}
