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
