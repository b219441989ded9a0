//! Metrics with ingress-nginx's names and labels, so existing dashboards keep working.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A counter exposed under its bare name, as client_golang's text format does
/// (`nginx_ingress_controller_requests`, not `..._requests_total`), so dashboards written for
/// ingress-nginx keep matching. OpenMetrics requires `_total` on typed counters, so it is
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

impl prometheus_client::metrics::TypedMetric for BareCounter {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Unknown;
}

impl prometheus_client::encoding::EncodeMetric for BareCounter {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.get())
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Unknown
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub status: String,
    pub method: String,
    pub path: String,
    pub namespace: String,
    pub ingress: String,
    pub service: String,
    pub host: String,
    pub canary: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub host: String,
    pub secret_name: String,
    pub namespace: String,
    pub identifier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub release: String,
    pub build: String,
    pub repository: String,
    pub controller_class: String,
}

/// The proxy's metric families.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, BareCounter>,
    pub request_duration: Family<RequestLabels, Histogram>,
    pub response_size: Family<RequestLabels, Histogram>,
    pub ssl_certificate_info: Family<CertLabels, Gauge>,
    pub config_last_reload_successful: Gauge,
    pub config_last_reload_successful_timestamp: Gauge,
    pub config_hash: Gauge,
    pub build_info: Family<BuildLabels, Gauge>,
}

/// ingress-nginx's `--time-buckets` default.
const TIME_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// ingress-nginx's `--size-buckets` default.
const SIZE_BUCKETS: [f64; 7] = [10.0, 100.0, 1000.0, 10000.0, 100000.0, 1e6, 1e7];

impl Metrics {
    pub fn register(registry: &mut Registry, controller_class: &str) -> Self {
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(TIME_BUCKETS.iter().copied())
            }),
            response_size: Family::new_with_constructor(|| {
                Histogram::new(SIZE_BUCKETS.iter().copied())
            }),
            ssl_certificate_info: Family::default(),
            config_last_reload_successful: Gauge::default(),
            config_last_reload_successful_timestamp: Gauge::default(),
            config_hash: Gauge::default(),
            build_info: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("nginx_ingress_controller");
        r.register(
            "requests",
            "The total number of client requests",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "The request processing time in seconds",
            m.request_duration.clone(),
        );
        r.register(
            "response_size",
            "The response length (including request line, header, and request body)",
            m.response_size.clone(),
        );
        r.register(
            "ssl_certificate_info",
            "Hold all labels associated to a certificate",
            m.ssl_certificate_info.clone(),
        );
        r.register(
            "config_last_reload_successful",
            "Whether the last configuration reload attempt was successful",
            m.config_last_reload_successful.clone(),
        );
        r.register(
            "config_last_reload_successful_timestamp_seconds",
            "Timestamp of the last successful configuration reload",
            m.config_last_reload_successful_timestamp.clone(),
        );
        r.register(
            "config_hash",
            "Running configuration hash actually running",
            m.config_hash.clone(),
        );
        r.register(
            "build_info",
            "A metric with a constant '1' labeled with information about the build",
            m.build_info.clone(),
        );
        m.build_info
            .get_or_create(&BuildLabels {
                release: env!("CARGO_PKG_VERSION").into(),
                build: "rust".into(),
                repository: "homecluster".into(),
                controller_class: controller_class.into(),
            })
            .set(1);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counter_keeps_the_upstream_name() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry, "k8s.io/ingress-nginx");
        m.requests
            .get_or_create(&RequestLabels {
                status: "200".into(),
                method: "GET".into(),
                path: "/".into(),
                namespace: "ns".into(),
                ingress: "i".into(),
                service: "s".into(),
                host: "h".into(),
                canary: String::new(),
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("nginx_ingress_controller_requests{status=\"200\",method=\"GET\""),
            "{text}"
        );
        assert!(
            !text.contains("nginx_ingress_controller_requests_total"),
            "{text}"
        );
        assert!(
            text.contains("nginx_ingress_controller_build_info{"),
            "{text}"
        );
    }
}
