//! The backend and device the model runs on: burn's `flex` CPU backend by default, CUDA with
//! the `cuda` cargo feature.

use burn::tensor::backend::Backend;

/// The backend used by the CLI and the model server.
#[cfg(not(feature = "cuda"))]
pub type DefaultBackend = burn::backend::Flex;

/// The backend used by the CLI and the model server.
#[cfg(feature = "cuda")]
pub type DefaultBackend = burn::backend::Cuda;

/// The default device of [`DefaultBackend`] (the CPU, or the first GPU).
pub fn default_device() -> burn::tensor::Device<DefaultBackend> {
    Default::default()
}

/// The backend's name, for logs.
pub fn backend_name() -> String {
    DefaultBackend::name(&default_device())
}

/// The format of the model's weights at inference, and the float type of its activations and KV
/// cache (f32 for the block formats, which are weights only). Logits always come out as `f32`;
/// RMSNorm statistics are taken in `f32` (as Hugging Face does), so f16's small range does not
/// overflow on the squares of the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Precision {
    /// 32-bit floats: the CUDA default, the reference the others are checked against.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16: f32's range with 8 bits of mantissa.
    Bf16,
    /// Linear weights (and the embedding) as 8-bit blocks of 32 with an f32 scale (GGUF's
    /// `Q8_0` layout, see `model::quant`), activations and KV cache in f32: a quarter of f32's
    /// memory and memory traffic. CPU only.
    Q8,
    /// A GGUF file's own 4- and 5-bit blocks where backflow has a kernel for them (`Q4_0`,
    /// `Q4_1`, `Q5_0`, `Q5_1`, and `Q4_K`/`Q5_K` repacked into `Q4_1`-style sub-blocks: the
    /// weights exactly as the file holds them, 0.75 bytes a weight at 4 bits, 0.875 at 5),
    /// [`Precision::Q8`] for every other tensor and for Hugging Face folders. CPU only.
    Native,
}

impl Precision {
    /// burn's data type for it.
    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            Precision::F32 => burn::tensor::DType::F32,
            Precision::F16 => burn::tensor::DType::F16,
            Precision::Bf16 => burn::tensor::DType::BF16,
            Precision::Q8 | Precision::Native => burn::tensor::DType::F32,
        }
    }

    /// The default of the backend this binary is built for: on the CPU the file's 4- and 5-bit
    /// blocks where it has them and 8-bit blocks elsewhere (a quarter of f32's memory or less, about
    /// 3x its batch-1 decoding, prefill near it; see README, "Weight formats"), f32 on CUDA.
    pub const fn backend_default() -> Precision {
        if cfg!(feature = "cuda") {
            Precision::F32
        } else {
            Precision::Native
        }
    }

    /// Whether linear weights are kept as blocks (8-bit, or the file's 4-bit).
    pub fn quantized(self) -> bool {
        matches!(self, Precision::Q8 | Precision::Native)
    }

    /// The flag's spelling (`f32`, `f16`, `bf16`, `q8`, `native`).
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::Q8 => "q8",
            Precision::Native => "native",
        }
    }

    /// Whether backend `B` stores and computes this type on `device` (a GPU without bf16
    /// arithmetic answers no, and loading then fails with a clear error instead of a kernel
    /// panic).
    pub fn supported_on<B: Backend>(self, device: &B::Device) -> bool {
        B::supports_dtype(device, self.dtype())
    }
}

impl Default for Precision {
    fn default() -> Self {
        Precision::backend_default()
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
