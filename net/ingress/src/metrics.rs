//! Prometheus metrics per route (the Ingress, host and path that matched):
//! requests by status code, latency histograms, upstream retries, and how
//! often the routes and certificates were swapped.
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `namespace/name`, empty when nothing matched.
    pub ingress: String,
    pub host: String,
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub ingress: String,
    pub host: String,
    pub path: String,
    pub status: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<StatusLabels, Counter>,
    pub latency: HistogramFamily,
    pub retries: Family<RouteLabels, Counter>,
    pub updates: Counter,
    pub routes: Gauge,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("orc_ingress");
        let requests = Family::<StatusLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let retries = Family::<RouteLabels, Counter>::default();
        let updates = Counter::default();
        let routes = Gauge::default();
        registry.register(
            "requests",
            "Requests answered, by route and status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from the request to the end of the response, by route",
            latency.clone(),
        );
        registry.register(
            "upstream_retries",
            "Requests sent again to another endpoint after a failed connection",
            retries.clone(),
        );
        registry.register(
            "config_updates",
            "Route and certificate tables swapped in",
            updates.clone(),
        );
        registry.register("routes", "Routes in the current table", routes.clone());
        Metrics {
            registry,
            requests,
            latency,
            retries,
            updates,
            routes,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_requests_and_histograms_per_route() {
        let m = Metrics::default();
        let r = RouteLabels {
            ingress: "default/web".into(),
            host: "a.test".into(),
            path: "/".into(),
        };
        m.requests
            .get_or_create(&StatusLabels {
                ingress: r.ingress.clone(),
                host: r.host.clone(),
                path: r.path.clone(),
                status: "200".into(),
            })
            .inc();
        m.latency.get_or_create(&r).observe(0.002);
        let t = m.text();
        assert!(
            t.contains(
                r#"orc_ingress_requests_total{ingress="default/web",host="a.test",path="/",status="200"} 1"#
            ),
            "{t}"
        );
        assert!(
            t.contains("orc_ingress_request_duration_seconds_bucket{"),
            "{t}"
        );
    }
}
