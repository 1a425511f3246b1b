//! Bounded concurrency that keeps each result paired with its input.

use std::future::Future;

use futures_core::Stream;
use futures_util::StreamExt as _;

/// Runs `f` over `items` with at most `concurrency` futures in flight, yielding outputs in
/// completion order. Items are pulled lazily, only when there is room: an iterator that stops
/// yielding (e.g. on Ctrl-C) stops new work while the work in flight finishes. Key the output
/// (return the item's index or path from `f`) to keep each result paired with its input.
///
/// ```
/// use futures_util::StreamExt as _;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let doubled: Vec<(usize, u32)> = vlm_core::batch::bounded([1u32, 2, 3].into_iter().enumerate(), 2, |(i, x)| async move {
///     (i, x * 2)
/// })
/// .collect()
/// .await;
/// assert_eq!(doubled.len(), 3);
/// # }
/// ```
pub fn bounded<I, F, Fut>(items: I, concurrency: usize, f: F) -> impl Stream<Item = Fut::Output>
where
    I: IntoIterator,
    F: FnMut(I::Item) -> Fut,
    Fut: Future,
{
    futures_util::stream::iter(items)
        .map(f)
        .buffer_unordered(concurrency.max(1))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_trait::async_trait;
    use url::Url;

    use crate::{HealthReport, VlmBackend, VlmClient, VlmError, VlmRequest, VlmResponse};

    /// Answers each prompt after a delay that makes later requests finish first.
    #[derive(Debug)]
    struct Backwards(Url);

    #[async_trait]
    impl VlmClient for Backwards {
        fn backend(&self) -> VlmBackend {
            VlmBackend::Vllm
        }
        fn model(&self) -> Option<&str> {
            Some("m")
        }
        fn base_url(&self) -> &Url {
            &self.0
        }
        async fn health(&self) -> Result<HealthReport, VlmError> {
            Err(VlmError::config("unused"))
        }
        async fn infer_single(&self, request: &VlmRequest) -> Result<VlmResponse, VlmError> {
            let n: u64 = request
                .prompt
                .parse()
                .map_err(|_| VlmError::config("not a number"))?;
            tokio::time::sleep(Duration::from_millis(5 * (20 - n))).await;
            if n % 7 == 3 {
                return Err(VlmError::config(format!("fails {n}")));
            }
            Ok(VlmResponse {
                text: format!("answer {n}"),
                reasoning: None,
                finish_reason: Some("stop".into()),
                usage: None,
                model: "m".into(),
                backend: VlmBackend::Vllm,
                latency: Duration::ZERO,
            })
        }
    }

    #[tokio::test]
    async fn batch_results_stay_paired_with_their_requests_under_out_of_order_completion() {
        let client = Backwards(Url::parse("http://127.0.0.1:1/v1/").unwrap());
        let requests: Vec<VlmRequest> = (0..20)
            .map(|i| VlmRequest::builder(i.to_string()).build().unwrap())
            .collect();
        let results = client.infer_batch(&requests, 6).await;
        assert_eq!(results.len(), 20);
        for (i, result) in results.iter().enumerate() {
            match result {
                Ok(r) => assert_eq!(r.text, format!("answer {i}")),
                Err(e) => assert_eq!((i % 7, e.to_string()), (3, format!("fails {i}"))),
            }
        }
    }
}
