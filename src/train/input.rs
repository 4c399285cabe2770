//! From the loader's bytes to model inputs, on the training device: u8 NHWC views ->
//! normalised f32 NCHW, u8 masks -> Bool `[B, N]`. The bytes cross to the device as u8
//! (a quarter of the f32 traffic); conversion and normalisation run there.

use tch::{Device, Kind, TchError, Tensor};

type Result<T> = std::result::Result<T, TchError>;

/// ImageNet channel means (RGB, on the 0..1 scale): the official pretraining runs with
/// `--imagenet_default_mean_and_std`.
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB, on the 0..1 scale).
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Normalises a u8 `[B, S, S, 3]` (NHWC, RGB) tensor, on whatever device it lives, to
/// f32 `[B, 3, S, S]` (NCHW shape, channels-last strides): `(x / 255 - mean) / std` per channel, computed
/// as one multiply-add per element (torchvision's `ToTensor` + `Normalize` up to f32
/// rounding).
pub fn normalize_nhwc(images: &Tensor, mean: [f64; 3], std: [f64; 3]) -> Result<Tensor> {
    let size = images.size();
    if size.len() != 4 || size[3] != 3 || size[1] != size[2] || images.kind() != Kind::Uint8 {
        return Err(TchError::Shape(format!(
            "normalize: expected u8 [B, S, S, 3] (NHWC) images, got {:?} {size:?}",
            images.kind()
        )));
    }
    let (scale, shift) = affine_on(images.device(), mean, std)?;
    let mut x = images.f_to_kind(Kind::Float)?;
    let _ = x.f_mul_(&scale)?;
    let _ = x.f_add_(&shift)?;
    // A channels-last view, not a contiguous copy: cuDNN then runs the patch
    // embedding's convolution with its NHWC kernels (2.4x faster measured on an H100,
    // as PyTorch gets from the same permuted input).
    x.f_permute([0, 3, 1, 2])
}

/// A normalisation's per-channel scale and shift, `[3]` f32 each, on `device`: made once
/// per thread, device and mean/std, then reused. A host-to-device copy of a pageable
/// tensor synchronises the stream, so doing it per batch would make every training step
/// wait, at its start, for the previous step's optimiser kernels.
fn affine_on(device: Device, mean: [f64; 3], std: [f64; 3]) -> Result<(Tensor, Tensor)> {
    type Entry = (Device, [u64; 6], Tensor, Tensor);
    thread_local! {
        static CACHE: std::cell::RefCell<Vec<Entry>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut key = [0u64; 6];
    for (k, v) in key.iter_mut().zip(mean.iter().chain(&std)) {
        *k = v.to_bits();
    }
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((_, _, scale, shift)) =
            cache.iter().find(|(d, k, ..)| *d == device && *k == key)
        {
            return Ok((scale.shallow_clone(), shift.shallow_clone()));
        }
        let scale: Vec<f32> = std.iter().map(|s| (1.0 / (255.0 * s)) as f32).collect();
        let shift: Vec<f32> = mean.iter().zip(std).map(|(m, s)| (-m / s) as f32).collect();
        let scale = Tensor::from_slice(&scale).f_to_device(device)?;
        let shift = Tensor::from_slice(&shift).f_to_device(device)?;
        cache.push((device, key, scale.shallow_clone(), shift.shallow_clone()));
        Ok((scale, shift))
    })
}

/// The loader's views (`Batch::weak()` / `Batch::strong()`: `batch * size * size * 3`
/// u8, NHWC RGB) -> normalised f32 `[B, 3, S, S]` on `device`, with ImageNet mean/std.
/// The u8 bytes are copied to the device as they are; the conversion happens there.
pub fn normalize_u8_nhwc(
    bytes: &[u8],
    batch: usize,
    size: usize,
    device: Device,
) -> Result<Tensor> {
    normalize_u8_nhwc_with(bytes, batch, size, IMAGENET_MEAN, IMAGENET_STD, device)
}

/// [`normalize_u8_nhwc`] with explicit mean and std (0..1 scale).
pub fn normalize_u8_nhwc_with(
    bytes: &[u8],
    batch: usize,
    size: usize,
    mean: [f64; 3],
    std: [f64; 3],
    device: Device,
) -> Result<Tensor> {
    let want = batch * size * size * 3;
    if bytes.len() != want || batch == 0 || size == 0 {
        return Err(TchError::Shape(format!(
            "normalize: {} bytes for batch {batch} x {size} x {size} x 3 (= {want}); \
             expected a non-empty NHWC u8 batch",
            bytes.len()
        )));
    }
    let (b, s) = (batch as i64, size as i64);
    let shape = [b, s, s, 3];
    let strides = [s * s * 3, s * 3, 3, 1];
    // SAFETY: the blob tensor borrows `bytes` (len checked above against shape x
    // strides) and never outlives this function: the `to` copy onto a CUDA device is
    // synchronous (non_blocking = false) and, on the CPU, `to_kind(Float)` inside
    // `normalize_nhwc` allocates the result, so nothing returned aliases `bytes`.
    let host =
        unsafe { Tensor::f_from_blob(bytes.as_ptr(), &shape, &strides, Kind::Uint8, Device::Cpu)? };
    let on_device = host.f_to_device(device)?;
    let out = normalize_nhwc(&on_device, mean, std);
    drop(on_device);
    drop(host);
    out
}

/// The loader's masks (`Batch::mask()`: `batch * patches` u8, 1 = masked, row-major
/// patches) -> Bool `[B, N]` on `device`.
pub fn mask_from_u8(bytes: &[u8], batch: usize, patches: usize, device: Device) -> Result<Tensor> {
    if bytes.len() != batch * patches || batch == 0 || patches == 0 {
        return Err(TchError::Shape(format!(
            "mask: {} bytes for batch {batch} x {patches} patches; expected a non-empty \
             [B, N] u8 mask",
            bytes.len()
        )));
    }
    Tensor::f_from_slice(bytes)?
        .f_view([batch as i64, patches as i64])?
        .f_to_device(device)?
        .f_ne(0)
}

/// One batch's bytes on the training device, before normalisation: what the loader
/// made, uploaded once (u8, a quarter of the f32 traffic). On CUDA the upload goes
/// through pinned memory on a side stream ([`super::cuda::upload`]), so uploading the
/// next batch overlaps the current step's compute.
#[derive(Debug)]
pub struct DeviceBatch {
    /// Weak (student) views, u8 `[B, S, S, 3]` NHWC.
    pub weak: Tensor,
    /// Strong (teacher) views, u8 `[B, S, S, 3]` NHWC.
    pub strong: Tensor,
    /// Masks, Bool `[B, N]` (true = masked).
    pub mask: Tensor,
    /// The loader position after this batch (checkpoints), when it came from a loader.
    pub state: Option<crate::loader::LoaderState>,
}

impl DeviceBatch {
    /// Uploads a loader batch (ConMIM task: both views and the mask) to `device`.
    pub fn upload(batch: &crate::loader::Batch, device: Device) -> Result<Self> {
        let (b, s, n) = (batch.len(), batch.image_size() as usize, batch.mask_len());
        let want = b * s * s * 3;
        if b == 0 || batch.weak().len() != want || batch.strong().len() != want {
            return Err(TchError::Shape(format!(
                "upload: a ConMIM batch of {b} x {s}px needs two views of {want} bytes, got                  {} and {}",
                batch.weak().len(),
                batch.strong().len()
            )));
        }
        if n == 0 || batch.mask().len() != b * n {
            return Err(TchError::Shape(format!(
                "upload: {} mask bytes for {b} x {n} patches",
                batch.mask().len()
            )));
        }
        let view = |bytes: &[u8]| -> Result<Tensor> {
            let (bi, si) = (b as i64, s as i64);
            // SAFETY: the blob borrows `bytes` (length checked above) only until
            // `upload` returns: it copies (CUDA: into pinned memory first; CPU: a copy).
            let host = unsafe {
                Tensor::f_from_blob(
                    bytes.as_ptr(),
                    &[bi, si, si, 3],
                    &[si * si * 3, si * 3, 3, 1],
                    Kind::Uint8,
                    Device::Cpu,
                )?
            };
            super::cuda::upload(&host, device)
        };
        let weak = view(batch.weak())?;
        let strong = view(batch.strong())?;
        let mask = super::cuda::upload(
            &Tensor::f_from_slice(batch.mask())?.f_view([b as i64, n as i64])?,
            device,
        )?
        .f_ne(0)?;
        Ok(DeviceBatch {
            weak,
            strong,
            mask,
            state: Some(batch.state()),
        })
    }

    /// Takes the next batch of `loader` and uploads it: the batch on `device`, the
    /// seconds blocked on the loader ("waiting for data"), the seconds uploading. The end
    /// of the stream is an error naming `step` (training streams are endless).
    pub fn next_from(
        loader: &mut crate::loader::Loader,
        device: Device,
        step: u64,
    ) -> anyhow::Result<(Self, f64, f64)> {
        use anyhow::Context;
        let t0 = std::time::Instant::now();
        let batch = match loader.next() {
            Some(b) => b.context("loading data")?,
            None => anyhow::bail!("the data stream ended at step {step}"),
        };
        let t1 = std::time::Instant::now();
        let x = Self::upload(&batch, device).context("uploading a batch")?;
        Ok((x, (t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64()))
    }

    /// A synthetic batch made on `device` (benchmarks: no host work, no copies):
    /// uniform random u8 views and exactly `masked` random masked patches per image.
    pub fn synthetic(
        batch: usize,
        size: usize,
        patches: usize,
        masked: usize,
        device: Device,
    ) -> Result<Self> {
        let (b, s, n) = (batch as i64, size as i64, patches as i64);
        let views = || Tensor::f_randint(256, [b, s, s, 3], (Kind::Uint8, device));
        let order = Tensor::f_rand([b, n], (Kind::Float, device))?.f_argsort(1, false)?;
        let rank = order.f_argsort(1, false)?;
        Ok(DeviceBatch {
            weak: views()?,
            strong: views()?,
            mask: rank.f_lt(masked as i64)?,
            state: None,
        })
    }

    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.weak.size()[0] as usize
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The view side in pixels.
    pub fn image_size(&self) -> usize {
        self.weak.size()[1] as usize
    }

    /// Patches per mask.
    pub fn mask_len(&self) -> usize {
        self.mask.size()[1] as usize
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, IndexOp, Kind, Tensor};

    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 37 % 256) as u8).collect()
    }

    #[test]
    fn normalizes_like_torchvision() {
        let (b, s) = (2, 5);
        let bytes = pattern(b * s * s * 3);
        let x = normalize_u8_nhwc(&bytes, b, s, Device::Cpu).unwrap();
        assert_eq!(x.size(), [2, 3, 5, 5]);
        assert_eq!(x.kind(), Kind::Float);
        assert_eq!(
            x.stride(),
            [75, 1, 15, 3],
            "a channels-last view of the NHWC bytes"
        );
        for (n, y, xx, c) in [(0, 0, 0, 0), (1, 4, 3, 2), (0, 2, 1, 1), (1, 0, 4, 0)] {
            let v = bytes[((n * s + y) * s + xx) * 3 + c] as f64;
            let want = (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            let got = x
                .i((n as i64, c as i64, y as i64, xx as i64))
                .double_value(&[]);
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        // Extremes.
        let white = normalize_u8_nhwc(&[255; 3], 1, 1, Device::Cpu).unwrap();
        let want: Vec<f64> = (0..3)
            .map(|c| (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
            .collect();
        let got: Vec<f64> = (0..3)
            .map(|c| white.i((0, c, 0, 0)).double_value(&[]))
            .collect();
        for c in 0..3 {
            assert!((got[c] - want[c]).abs() < 1e-5);
        }
    }

    #[test]
    fn explicit_mean_std() {
        let x =
            normalize_u8_nhwc_with(&[0, 255, 51], 1, 1, [0.5; 3], [0.5; 3], Device::Cpu).unwrap();
        let v: Vec<f32> = Vec::try_from(x.flatten(0, -1)).unwrap();
        assert!((v[0] + 1.0).abs() < 1e-6 && (v[1] - 1.0).abs() < 1e-6);
        assert!((v[2] - (0.2 - 0.5) / 0.5).abs() < 1e-6);
        // The per-channel constants are cached by mean/std: other values, other result.
        let y =
            normalize_u8_nhwc_with(&[0, 255, 51], 1, 1, [0.0; 3], [1.0; 3], Device::Cpu).unwrap();
        let w: Vec<f32> = Vec::try_from(y.flatten(0, -1)).unwrap();
        assert!(w[0].abs() < 1e-6 && (w[1] - 1.0).abs() < 1e-6 && (w[2] - 0.2).abs() < 1e-6);
        let again =
            normalize_u8_nhwc_with(&[0, 255, 51], 1, 1, [0.5; 3], [0.5; 3], Device::Cpu).unwrap();
        assert!(again.equal(&x));
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let e = normalize_u8_nhwc(&[0; 10], 1, 2, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("10 bytes") && e.contains("= 12"), "{e}");
        assert!(normalize_u8_nhwc(&[], 0, 2, Device::Cpu).is_err());
        let f = Tensor::zeros([1, 2, 2, 3], (Kind::Float, Device::Cpu));
        assert!(normalize_nhwc(&f, IMAGENET_MEAN, IMAGENET_STD).is_err());
        assert!(mask_from_u8(&[0; 5], 2, 3, Device::Cpu).is_err());
    }

    #[test]
    fn masks_become_bool() {
        let m = mask_from_u8(&[1, 0, 0, 0, 1, 1], 2, 3, Device::Cpu).unwrap();
        assert_eq!(m.kind(), Kind::Bool);
        assert_eq!(m.size(), [2, 3]);
        let v: Vec<bool> = Vec::try_from(m.flatten(0, -1)).unwrap();
        assert_eq!(v, [true, false, false, false, true, true]);
    }
}
