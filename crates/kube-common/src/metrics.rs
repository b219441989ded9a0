//! Metric types shared by components that keep upstream (client_golang) metric names.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::{MetricType, TypedMetric};

/// A counter exposed under its bare name, as client_golang's text format does (e.g.
/// `certmanager_controller_sync_call_count`, not `..._total`), so dashboards written for the
/// upstream component keep matching. OpenMetrics requires `_total` on typed counters, so it is
/// exposed as `unknown`; Prometheus ingests it as untyped and `rate()` works on it as before.
#[derive(Clone, Debug, Default)]
pub struct BareCounter(Counter);

impl BareCounter {
    pub fn inc(&self) {
        self.0.inc();
    }

    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

impl TypedMetric for BareCounter {
    const TYPE: MetricType = MetricType::Unknown;
}

impl prometheus_client::encoding::EncodeMetric for BareCounter {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.get())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Unknown
    }
}
