//! Metrics with ingress-nginx's names and labels, so existing dashboards keep working.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `nginx_ingress_controller_requests` keeps its bare client_golang name (type `unknown`) so
/// dashboards written for ingress-nginx keep matching; see kube-common's `BareCounter`.
pub use kube_common::metrics::BareCounter;

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

/// The three per-request series of one label set, resolved once (the handles share their
/// values with the families).
#[derive(Clone, Debug)]
pub struct RequestSeries {
    pub requests: BareCounter,
    pub duration: Histogram,
    pub size: Histogram,
}

/// Series already resolved for one location, by what varies per request (status, method,
/// host): the request path then skips building eight label strings and three family look-ups.
/// Lives in the location, so it goes away with the configuration generation.
#[derive(Debug, Default)]
pub struct SeriesCache(std::sync::RwLock<Vec<SeriesEntry>>);

/// (status, method, host) and its series.
type SeriesEntry = (u16, &'static str, Box<str>, RequestSeries);

/// Entries past this many are looked up in the families each time (a wildcard host can see
/// unboundedly many hosts).
const SERIES_CACHE_MAX: usize = 32;

impl SeriesCache {
    /// The cached series for (status, method, host), else `make()`'s, remembered.
    pub fn get_or_insert(
        &self,
        status: u16,
        method: &'static str,
        host: &str,
        make: impl FnOnce() -> RequestSeries,
    ) -> RequestSeries {
        let hit = |entries: &[SeriesEntry]| {
            entries
                .iter()
                .find(|(s, m, h, _)| *s == status && *m == method && &**h == host)
                .map(|(_, _, _, series)| series.clone())
        };
        if let Some(series) = hit(&self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
        {
            return series;
        }
        let series = make();
        let mut entries = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() < SERIES_CACHE_MAX && hit(&entries).is_none() {
            entries.push((status, method, host.into(), series.clone()));
        }
        series
    }
}

/// The `method` label: the standard methods by name, anything else (a client may send any
/// token) folded into one value, so clients cannot grow the families.
pub fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::HEAD, "HEAD"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    KNOWN
        .iter()
        .find(|(m, _)| m == method)
        .map_or("UNKNOWN", |(_, name)| name)
}

/// The `host` label: the request's host when an Ingress rule names it exactly, else empty
/// (ingress-nginx's default without `--metrics-per-undefined-host`): a catch-all or wildcard
/// rule would otherwise make a series per host a client invents.
pub fn host_label<'a>(rule_host: &str, from_ingress: bool, request_host: &'a str) -> &'a str {
    if from_ingress && rule_host == request_host {
        request_host
    } else {
        ""
    }
}

impl Metrics {
    /// The series of one label set, from the families.
    pub fn series(&self, labels: &RequestLabels) -> RequestSeries {
        RequestSeries {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.request_duration.get_or_create(labels).clone(),
            size: self.response_size.get_or_create(labels).clone(),
        }
    }
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

/// A response body that observes the request duration and response size once, when it ends
/// (or is dropped early, e.g. by a client that went away).
pub struct Metered<B> {
    inner: B,
    started: std::time::Instant,
    bytes: u64,
    duration: Histogram,
    size: Histogram,
    done: bool,
}

impl<B> Metered<B> {
    pub fn new(
        inner: B,
        started: std::time::Instant,
        duration: Histogram,
        size: Histogram,
    ) -> Self {
        Self {
            inner,
            started,
            bytes: 0,
            duration,
            size,
            done: false,
        }
    }

    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.duration.observe(self.started.elapsed().as_secs_f64());
            self.size.observe(self.bytes as f64);
        }
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> http_body::Body for Metered<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            std::task::Poll::Ready(None) | std::task::Poll::Ready(Some(Err(_))) => self.finish(),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metered_body_observes_size_at_the_end() {
        use http_body_util::BodyExt;
        let duration = Histogram::new(TIME_BUCKETS.iter().copied());
        let size = Histogram::new(SIZE_BUCKETS.iter().copied());
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"12345"));
        let metered = Metered::new(
            body,
            std::time::Instant::now(),
            duration.clone(),
            size.clone(),
        );
        let collected = metered.collect().await.expect("body").to_bytes();
        assert_eq!(collected.len(), 5);
        let mut registry = Registry::default();
        registry.register("size", "size", size);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("size_sum 5.0") && text.contains("size_count 1"),
            "{text}"
        );
    }

    #[test]
    fn labels_a_client_controls_are_bounded() {
        use http::Method;
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        for m in ["FOO", "get", "PROPFIND", "X1234567"] {
            let m = Method::from_bytes(m.as_bytes()).expect("token");
            assert_eq!(method_label(&m), "UNKNOWN");
        }
        assert_eq!(host_label("a.example", true, "a.example"), "a.example");
        assert_eq!(host_label("*.example", true, "x.example"), "", "wildcard");
        assert_eq!(host_label("_", true, "anything"), "", "catch-all rule");
        assert_eq!(host_label("a.example", false, "a.example"), "");
    }

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
