//! A range of columns of a row-major matrix in host memory, copied onto a GPU as one pitched DMA
//! (`cuMemcpy2D`) instead of being gathered row by row on the host first. A tensor-parallel rank
//! loads its part of the o and down projections this way: from the pool's pinned pages the copy
//! runs at the link's speed, where the host gather ran at a few GB/s.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Result, Tensor};

static ENABLED: AtomicBool = AtomicBool::new(cfg!(feature = "cuda"));

/// Turns pitched copies off (a failed self-check): columns are gathered on the host again.
pub fn disable(reason: &str) {
    if ENABLED.swap(false, Ordering::Relaxed) {
        tracing::warn!(reason, "pitched column copies disabled; column parts are gathered on the host");
    }
}

/// Copies columns 3..8 of a 7 x 10 matrix of distinct values onto `device` and returns how many
/// elements differ from the host's own gather (0 when the copy is right). Run at GPU boot.
pub fn self_check(device: &Device) -> Result<usize> {
    let values: Vec<f32> = (0..70).map(|i| i as f32).collect();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let Some(copied) = columns(&bytes, [7, 10], [3, 5], DType::F32, device) else { return Ok(0) };
    let copied = copied?.to_vec2::<f32>()?;
    let expected = Tensor::from_vec(values, (7, 10), &Device::Cpu)?.narrow(1, 3, 5)?.to_vec2::<f32>()?;
    Ok(copied.iter().flatten().zip(expected.iter().flatten()).filter(|(a, b)| a != b).count())
}

/// Columns `start..start + len` of the `[rows, cols]` matrix of `dtype` elements whose bytes are
/// `bytes`, as a `[rows, len]` tensor on `device`, queued on the device's stream (the caller
/// synchronizes before `bytes` may go). `None` where no pitched copy applies (not a CUDA GPU, or
/// not a float dtype): the caller gathers on the host.
pub fn columns(
    bytes: &[u8],
    [rows, cols]: [usize; 2],
    [start, len]: [usize; 2],
    dtype: DType,
    device: &Device,
) -> Option<Result<Tensor>> {
    if !ENABLED.load(Ordering::Relaxed) || !device.is_cuda() || !matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
    {
        return None;
    }
    let elem = dtype.size_in_bytes();
    if bytes.len() != rows * cols * elem || start + len > cols {
        return Some(Err(candle_core::Error::Msg(format!(
            "columns {start}..{} of a [{rows}, {cols}] matrix: {} bytes do not hold it",
            start + len,
            bytes.len()
        ))));
    }
    #[cfg(feature = "cuda")]
    {
        let copy = match dtype {
            DType::BF16 => cuda::copy::<half::bf16>,
            DType::F16 => cuda::copy::<half::f16>,
            _ => cuda::copy::<f32>,
        };
        Some(copy(bytes, [rows, cols], [start, len], device))
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtrMut, sys};
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{Device, Result, Storage, Tensor, bail};

    pub fn copy<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        bytes: &[u8],
        [rows, cols]: [usize; 2],
        [start, len]: [usize; 2],
        device: &Device,
    ) -> Result<Tensor> {
        let dev = device.as_cuda_device()?;
        let elem = std::mem::size_of::<T>();
        let stream = dev.cuda_stream();
        // SAFETY: every element is written by the copy below before anything reads it.
        let mut dst = unsafe { dev.alloc::<T>(rows * len) }?;
        {
            let (dst_ptr, _record) = dst.device_ptr_mut(&stream);
            let copy = sys::CUDA_MEMCPY2D {
                srcXInBytes: start * elem,
                srcY: 0,
                srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
                srcHost: bytes.as_ptr().cast(),
                srcDevice: 0,
                srcArray: std::ptr::null_mut(),
                srcPitch: cols * elem,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: dst_ptr,
                dstArray: std::ptr::null_mut(),
                dstPitch: len * elem,
                WidthInBytes: len * elem,
                Height: rows,
            };
            stream.context().bind_to_thread().map_err(candle_core::Error::wrap)?;
            // SAFETY: source rows lie within `bytes` (checked by the caller), the destination holds
            // rows * len elements; the caller keeps `bytes` alive until the stream has run this.
            let status = unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) };
            if status != sys::CUresult::CUDA_SUCCESS {
                bail!("cuMemcpy2DAsync: {status:?}");
            }
        }
        let storage = CudaStorage::wrap_cuda_slice(dst, dev.clone());
        Ok(Tensor::from_storage(Storage::Cuda(storage), (rows, len), BackpropOp::none(), false))
    }
}
