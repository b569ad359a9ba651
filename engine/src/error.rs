use std::time::Duration;

/// Everything that can go wrong in the engine. The server maps each kind to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request's tensors do not fit the model (shape, type, count): the caller's fault.
    #[error("{0}")]
    InvalidInput(String),
    /// The model files are malformed or incomplete.
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// Well-formed, but uses something the engine cannot run (operator, architecture, type).
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The requested device does not exist in this build or on this machine.
    #[error("device error: {0}")]
    Device(String),
    /// The device has not the free memory a version needs: refused before loading it.
    #[error("not enough device memory: {0}")]
    DeviceMemory(String),
    /// The model failed while running a batch.
    #[error("execution failed: {0}")]
    Execution(String),
    /// The queue holds `max_queue_size` requests already.
    #[error("queue is full ({queued} requests waiting); retry later")]
    QueueFull { queued: usize, retry_after: Duration },
    /// Adaptive batching predicts the request would finish after its deadline (or the model's
    /// latency objective): refused at once rather than served late.
    #[error("would miss its deadline: predicted to finish in {predicted:?}, allowed {deadline:?}; retry later")]
    WouldMissDeadline { predicted: Duration, deadline: Duration, retry_after: Duration },
    /// The request's deadline passed while it waited in the queue; it never reached the device.
    #[error("deadline exceeded after {waited:?} in the queue")]
    DeadlineExceeded { waited: Duration },
    /// The scheduler has shut down (the version is being unloaded).
    #[error("model is not available: {0}")]
    Unavailable(String),
}
