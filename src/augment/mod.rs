//! Augmentation: random *parameters* and the pixel ops that apply them.
//!
//! Everything here is a pure function of `(params, pixels)` or of a seeded random
//! stream; nothing does I/O. Randomness comes only from [`params::sample_rng`], one
//! [`SplitMix64`](crate::seed::SplitMix64) stream per `(seed, epoch, sample)`, so a
//! sample's augmentation does not depend on which worker handles it or when.
//!
//! * [`params`] samples the ConMIM view parameters: the shared crop
//!   (torchvision's `RandomResizedCrop.get_params`) and flip, and the teacher's
//!   "strong" extras (colour jitter, grayscale, blur, solarisation).
//! * [`color`] applies the photometric ops in place on interleaved RGB8 buffers with
//!   torchvision's uint8 tensor semantics (`_functional_tensor`), plus PIL's
//!   `GaussianBlur`, bit for bit.
//! * [`views`] turns encoded bytes into views: decode (only the crop's region,
//!   DCT-scaled when the crop allows), crop + resize + flip into the caller's buffer,
//!   the strong view from the weak one, and the evaluation transform (resize + centre
//!   crop).
//! * [`randaug`] is the fine-tuning side: timm's RandAugment and RandomErasing.

pub mod color;
pub mod params;
pub mod randaug;
pub mod views;
