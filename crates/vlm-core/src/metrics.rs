//! Reading one gauge from a server's Prometheus text (`GET /metrics`).

/// The sum of every sample of gauge `name` (vLLM labels one per engine with data parallelism:
/// `vllm:num_requests_waiting{engine="0",model_name="m"} 3.0`); `None` when there is none.
pub(crate) fn gauge_sum(text: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `{labels} value` or ` value`.
        let value = match rest.chars().next() {
            Some('{') => rest.rsplit_once('}').map(|(_, v)| v),
            Some(' ' | '\t') => Some(rest),
            _ => None,
        };
        let Some(value) = value.and_then(|v| v.split_whitespace().next()) else {
            continue;
        };
        if let Ok(v) = value.parse::<f64>()
            && v.is_finite()
        {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::gauge_sum;

    #[test]
    fn sums_a_gauge_over_its_labels_and_ignores_its_neighbours() {
        let text = "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{engine=\"0\",model_name=\"Qwen/Qwen2-VL-2B-Instruct\"} 3.0\n\
vllm:num_requests_waiting{engine=\"1\",model_name=\"Qwen/Qwen2-VL-2B-Instruct\"} 2.0\n\
vllm:num_requests_waiting_by_reason{reason=\"capacity\"} 9.0\n\
vllm:num_requests_running{engine=\"0\"} 7.0\n";
        assert_eq!(gauge_sum(text, "vllm:num_requests_waiting"), Some(5.0));
        assert_eq!(gauge_sum(text, "vllm:num_requests_running"), Some(7.0));
        assert_eq!(
            gauge_sum(
                "lmdeploy:num_requests_waiting 4\n",
                "lmdeploy:num_requests_waiting"
            ),
            Some(4.0)
        );
        assert_eq!(gauge_sum(text, "lmdeploy:num_requests_waiting"), None);
        assert_eq!(
            gauge_sum(
                "vllm:num_requests_waiting{} NaN\n",
                "vllm:num_requests_waiting"
            ),
            None
        );
    }
}
