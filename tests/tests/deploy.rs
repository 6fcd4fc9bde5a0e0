//! Every kustomize overlay in deploy/ renders (`kubectl kustomize`) and validates offline
//! with `kubernetes-validate --strict` against several Kubernetes versions; the DaemonSet
//! keeps the least-privilege properties the other tests prove.
//!
//! The optional monitoring component (deploy/components/monitoring) renders into each
//! overlay and validates the same way for its core objects (Service, ConfigMap). Its
//! Prometheus Operator objects are custom resources that kubernetes-validate has no schema
//! for: they are read here into types that mirror the fields of the
//! `monitoring.coreos.com/v1` CRDs the component uses and reject any other field, and are
//! checked to fit together (the ServiceMonitor selects the Service, which selects the
//! agent's pods on its metrics port; the alerts' `job` is the one the ServiceMonitor
//! gives). Every alert expression and dashboard query is parsed as PromQL, and every
//! metric and label value it selects must be one that a running agent exports on
//! `/metrics`: a renamed metric fails here until the rules and dashboard follow.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Component, Path, PathBuf},
};

use interceptor_tests::{
    Node,
    clients::{boto3, raw},
    cluster::{AgentBuilder, Peers},
    cmd,
    control_plane::ControlPlane,
    fake_imds::FakeImds,
    moto::MotoServer,
    peers::venv,
    require_root,
};
use promql_parser::{
    label::MatchOp,
    parser::{self, Expr, VectorSelector},
    util::{ExprVisitor, walk_expr},
};
use serde::Deserialize;

const OVERLAYS: [&str; 2] = ["generic", "eks"];
const VERSIONS: [&str; 3] = ["1.30.0", "1.33.0", "1.37.0"];
const MONITORING: &str = "components/monitoring";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn render(dir: &Path) -> String {
    cmd::run("kubectl", &["kustomize", &dir.display().to_string()])
}

fn render_overlay(overlay: &str) -> String {
    render(&deploy().join("overlays").join(overlay))
}

/// `overlay` with the monitoring component added, as a user would add it. kustomize
/// refuses absolute paths, so the kustomization is written in the target directory with
/// relative ones.
fn render_with_monitoring(overlay: &str) -> String {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "deploy-monitoring-{}-{overlay}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let to = |target: PathBuf| relative(&dir, &target).display().to_string();
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n  - {}\n",
            to(deploy().join("overlays").join(overlay)),
            to(deploy().join(MONITORING)),
        ),
    )
    .unwrap();
    let rendered = render(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    rendered
}

/// The path from directory `from` to `to` (both made absolute and canonical).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (from, to) = (from.canonicalize().unwrap(), to.canonicalize().unwrap());
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut path: PathBuf = from.components().skip(common).map(|_| "..").collect();
    path.extend(to.components().skip(common).map(Component::as_os_str));
    path
}

/// `kubernetes-validate --strict` on `rendered` for each version; returns its output.
fn validate(name: &str, rendered: &str) -> String {
    let validate = venv().join("bin/kubernetes-validate");
    let file = std::env::temp_dir().join(format!(
        "interceptor-deploy-{}-{name}.yaml",
        std::process::id()
    ));
    std::fs::write(&file, rendered).unwrap();
    let mut all = String::new();
    for version in VERSIONS {
        let out = cmd::output(
            &validate.display().to_string(),
            &[
                "--strict",
                "--kubernetes-version",
                version,
                &file.display().to_string(),
            ],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{name} against {version}:\n{text}");
        all.push_str(&text);
    }
    let _ = std::fs::remove_file(&file);
    all
}

#[test]
fn overlays_render_and_validate_strictly() {
    for overlay in OVERLAYS {
        let text = validate(overlay, &render_overlay(overlay));
        assert_eq!(
            text.matches("passed for resource daemonset/interceptor")
                .count(),
            VERSIONS.len(),
            "{overlay}:\n{text}"
        );
    }
}

#[test]
fn the_daemonset_is_least_privilege_and_wired_like_the_agent_expects() {
    for overlay in OVERLAYS {
        let rendered = render_overlay(overlay);
        for needed in [
            "privileged: false",
            "allowPrivilegeEscalation: false",
            "readOnlyRootFilesystem: true",
            "hostNetwork: true",
            "priorityClassName: system-node-critical",
            // Ready from its own file (an HTTP probe could be answered by the old agent
            // sharing the admin port during a surge), alive by /healthz.
            "--ready-file=/run/interceptor/ready",
            "- ready\n            - --file\n            - /run/interceptor/ready",
            "path: /healthz",
            "fieldPath: status.hostIP",
            "fieldPath: spec.nodeName",
            "fieldPath: metadata.uid",
            "path: /sys/fs/bpf",
            "path: /sys/fs/cgroup",
        ] {
            assert!(rendered.contains(needed), "{overlay}: no {needed:?}");
        }
        // Exactly the capabilities tests/tests/capabilities.rs proves necessary (its
        // `NEEDED`): CAP_PERFMON went with the surge takeover's programs.
        let add: Vec<&str> = rendered
            .lines()
            .skip_while(|line| !line.trim_start().starts_with("add:"))
            .skip(1)
            .map_while(|line| line.trim_start().strip_prefix("- "))
            .collect();
        assert_eq!(add, ["BPF", "NET_ADMIN"], "{overlay}: capabilities added");
        assert!(
            !rendered.contains("SYS_ADMIN") && !rendered.contains("privileged: true"),
            "{overlay}"
        );
    }
}

// The fields of the monitoring.coreos.com/v1 CRDs the component uses, under their CRD
// names; any other field is an error (a typo would otherwise be silently ignored by
// the operator).

type Labels = BTreeMap<String, String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    name: String,
    namespace: String,
    labels: Labels,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitor {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Meta,
    spec: ServiceMonitorSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    job_label: String,
    selector: LabelSelector,
    namespace_selector: NamespaceSelector,
    endpoints: Vec<Endpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LabelSelector {
    match_labels: Labels,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    match_names: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Endpoint {
    port: String,
    path: String,
    interval: String,
    relabelings: Vec<Relabeling>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Relabeling {
    source_labels: Vec<String>,
    target_label: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PrometheusRule {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Meta,
    spec: RuleSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    wait: String,
    labels: Labels,
    annotations: Labels,
}

/// The rendered objects of one kind, as JSON values.
fn objects<'a>(documents: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    documents
        .iter()
        .filter(|document| document["kind"] == kind)
        .collect()
}

fn one<'a>(documents: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let found = objects(documents, kind);
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

fn strict<T: for<'de> Deserialize<'de>>(value: &serde_json::Value, what: &str) -> T {
    serde_json::from_value(value.clone())
        .unwrap_or_else(|error| panic!("{what} does not fit the CRD's fields: {error}"))
}

fn labels(value: &serde_json::Value) -> Labels {
    serde_json::from_value(value.clone()).unwrap_or_default()
}

fn subset(small: &Labels, big: &Labels) -> bool {
    small.iter().all(|(key, value)| big.get(key) == Some(value))
}

/// A Prometheus duration (`30s`, `5m`, `1h30m`).
fn is_duration(text: &str) -> bool {
    promql_parser::util::duration::parse_duration(text).is_ok()
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(deploy().join(MONITORING).join("dashboard.json")).unwrap();
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every PromQL query of the alerting rules and the dashboard, with where it is.
fn queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(deploy().join(MONITORING).join("prometheusrule.yaml")).unwrap();
    let rules: PrometheusRule = strict(
        &serde_saphyr::from_str::<serde_json::Value>(&text).unwrap(),
        "prometheusrule.yaml",
    );
    let mut queries: Vec<(String, String)> = rules
        .spec
        .groups
        .into_iter()
        .flat_map(|group| group.rules)
        .map(|rule| (format!("alert {}", rule.alert), rule.expr))
        .collect();
    let dashboard = dashboard();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push((
                format!("panel {:?} {}", panel["title"], target["refId"]),
                grafana_to_promql(target["expr"].as_str().expect("an expr")),
            ));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().expect("list") {
        if let Some(query) = variable["query"]["query"].as_str() {
            // label_values(METRIC, LABEL): the metric must exist like any other.
            let metric = query
                .strip_prefix("label_values(")
                .and_then(|rest| rest.split_once(','))
                .map(|(metric, _)| metric.trim().to_owned())
                .unwrap_or_else(|| panic!("variable query {query:?}"));
            queries.push((format!("variable {}", variable["name"]), metric));
        }
    }
    queries
}

/// A Grafana query with its variables replaced by values Prometheus would see.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$node", ".*")
}

/// The vector selectors of `expr` (those inside range selectors included).
fn selectors(expr: &str) -> Result<Vec<VectorSelector>, String> {
    struct Collect(Vec<VectorSelector>);
    impl ExprVisitor for Collect {
        type Error = String;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
            match expr {
                Expr::VectorSelector(selector) => self.0.push(selector.clone()),
                Expr::MatrixSelector(matrix) => self.0.push(matrix.vs.clone()),
                _ => {}
            }
            Ok(true)
        }
    }
    let parsed = parser::parse(expr)?;
    let mut collect = Collect(Vec::new());
    walk_expr(&mut collect, &parsed)?;
    Ok(collect.0)
}

/// The name a selector selects by (`metric{...}` or `{__name__="metric"}`).
fn metric_name(selector: &VectorSelector) -> Option<String> {
    selector.name.clone().or_else(|| {
        selector
            .matchers
            .matchers
            .iter()
            .find(|matcher| matcher.name == "__name__" && matcher.op == MatchOp::Equal)
            .map(|matcher| matcher.value.clone())
    })
}

#[test]
fn the_monitoring_component_renders_validates_and_fits_together() {
    for overlay in OVERLAYS {
        let rendered = render_with_monitoring(overlay);
        let text = validate(&format!("{overlay}-monitoring"), &rendered);
        for resource in [
            "service/interceptor-metrics",
            "configmap/interceptor-dashboard",
            "daemonset/interceptor",
        ] {
            assert_eq!(
                text.matches(&format!("passed for resource {resource}"))
                    .count(),
                VERSIONS.len(),
                "{overlay}: {resource}\n{text}"
            );
        }
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&rendered).expect("the rendered YAML parses");
        let daemonset = one(&documents, "DaemonSet");
        let service = one(&documents, "Service");
        let monitor: ServiceMonitor = strict(one(&documents, "ServiceMonitor"), "ServiceMonitor");
        let rules: PrometheusRule = strict(one(&documents, "PrometheusRule"), "PrometheusRule");
        let namespace = daemonset["metadata"]["namespace"].as_str().unwrap();
        assert_eq!(service["metadata"]["namespace"], namespace);
        assert_eq!(monitor.metadata.namespace, namespace);
        assert_eq!(rules.metadata.namespace, namespace);
        assert_eq!(monitor.metadata.name, "interceptor");
        assert_eq!(rules.metadata.name, "interceptor");
        assert!(!monitor.metadata.labels.is_empty() && !rules.metadata.labels.is_empty());

        // Service -> the agent's pods, on the agent's admin port (the one its liveness
        // probe asks): the agent declares no container ports, which with the host's
        // network would be host ports and keep an upgrade's surge pod off the node.
        let pod_labels = labels(&daemonset["spec"]["template"]["metadata"]["labels"]);
        let service_selector = labels(&service["spec"]["selector"]);
        assert!(
            subset(&service_selector, &pod_labels),
            "{overlay}: the Service selects {service_selector:?}, the pods have {pod_labels:?}"
        );
        assert_eq!(service["spec"]["clusterIP"], "None", "headless");
        let ports = service["spec"]["ports"].as_array().unwrap();
        let agent = &daemonset["spec"]["template"]["spec"]["containers"][0];
        assert!(
            agent["ports"].is_null(),
            "{overlay}: the agent declares container ports: {}",
            agent["ports"]
        );
        let admin_port = &agent["livenessProbe"]["httpGet"]["port"];
        assert!(admin_port.is_u64(), "{overlay}: no admin port in {agent}");
        assert!(!ports.is_empty(), "{overlay}: a Service without ports");
        for port in ports {
            assert!(
                port["port"] == *admin_port && port["targetPort"] == *admin_port,
                "{overlay}: Service port {port} is not the agent's admin port {admin_port}"
            );
        }
        // ServiceMonitor -> Service, and the job label the alerts select on.
        let service_labels = labels(&service["metadata"]["labels"]);
        assert!(
            subset(&monitor.spec.selector.match_labels, &service_labels),
            "{overlay}: the ServiceMonitor selects {:?}, the Service has {service_labels:?}",
            monitor.spec.selector.match_labels
        );
        assert_eq!(monitor.spec.namespace_selector.match_names, [namespace]);
        let job = service_labels
            .get(&monitor.spec.job_label)
            .unwrap_or_else(|| panic!("no Service label {}", monitor.spec.job_label));
        for endpoint in &monitor.spec.endpoints {
            assert!(
                ports
                    .iter()
                    .any(|port| port["name"] == endpoint.port.as_str()),
                "no Service port named {}",
                endpoint.port
            );
            assert_eq!(endpoint.path, "/metrics");
            assert!(is_duration(&endpoint.interval), "{}", endpoint.interval);
            for relabel in &endpoint.relabelings {
                assert!(!relabel.source_labels.is_empty() && !relabel.target_label.is_empty());
            }
        }

        // The rules: unique names, PromQL that parses, a duration, a severity, a summary.
        let mut names = BTreeSet::new();
        for group in &rules.spec.groups {
            assert!(!group.name.is_empty());
            for rule in &group.rules {
                assert!(names.insert(rule.alert.clone()), "{} twice", rule.alert);
                let selected = selectors(&rule.expr)
                    .unwrap_or_else(|error| panic!("{}: {error}: {}", rule.alert, rule.expr));
                assert!(!selected.is_empty(), "{} selects nothing", rule.alert);
                for selector in &selected {
                    for matcher in &selector.matchers.matchers {
                        if matcher.name == "job" {
                            assert_eq!(&matcher.value, job, "{}: job", rule.alert);
                        }
                    }
                }
                assert!(is_duration(&rule.wait), "{}: for {}", rule.alert, rule.wait);
                let severity = rule.labels.get("severity").map(String::as_str);
                assert!(
                    matches!(severity, Some("warning" | "critical")),
                    "{}: severity {severity:?}",
                    rule.alert
                );
                assert!(
                    rule.annotations.contains_key("summary")
                        && rule.annotations.contains_key("description"),
                    "{}",
                    rule.alert
                );
            }
        }
        for alert in [
            "InterceptorAgentDown",
            "InterceptorAgentNotReady",
            "InterceptorObserveMode",
            "InterceptorCallersRefused",
            "InterceptorStsErrors",
            "InterceptorCredentialsNearExpiry",
            "InterceptorKernelMapsNearFull",
        ] {
            assert!(names.contains(alert), "no alert {alert}");
        }

        // The dashboard ConfigMap carries the file, labelled for Grafana's sidecar.
        let configmap = one(&documents, "ConfigMap");
        assert_eq!(configmap["metadata"]["labels"]["grafana_dashboard"], "1");
        let shipped: serde_json::Value =
            serde_json::from_str(configmap["data"]["interceptor.json"].as_str().unwrap()).unwrap();
        assert_eq!(shipped, dashboard());
    }
    // Every query parses as PromQL; panels have unique ids.
    for (place, query) in queries() {
        let selected =
            selectors(&query).unwrap_or_else(|error| panic!("{place}: {error}: {query}"));
        assert!(!selected.is_empty(), "{place} selects nothing: {query}");
    }
    let dashboard = dashboard();
    let ids: Vec<_> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|panel| panel["id"].as_u64().expect("a numeric id"))
        .collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len());
}

/// The series of a Prometheus text exposition: metric name -> label sets.
fn series(exposition: &str) -> BTreeMap<String, Vec<Labels>> {
    let mut series: BTreeMap<String, Vec<Labels>> = BTreeMap::new();
    for line in exposition.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(at) => line.split_at(at),
            None => continue,
        };
        let mut labels = Labels::new();
        if let Some(body) = rest.strip_prefix('{') {
            // name="value" pairs; values may hold escaped quotes.
            let mut chars = body.chars().peekable();
            loop {
                let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                let key = key.trim_start_matches(',').trim().to_owned();
                if key.is_empty() || key.starts_with('}') || chars.next() != Some('"') {
                    break;
                }
                let mut value = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next()),
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
            }
        }
        series.entry(name.to_owned()).or_default().push(labels);
    }
    series
}

/// Labels Prometheus itself attaches to every scraped series (target labels), which the
/// agent's exposition cannot show.
const TARGET_LABELS: [&str; 3] = ["job", "instance", "node"];
/// Series Prometheus makes itself, not the agent.
const PROMETHEUS_SERIES: [&str; 1] = ["up"];

/// What is wrong with `selector` against the agent's `exported` series, if anything: its
/// metric is not exported, or a label it matches on is on none of the metric's series, or
/// no series has the value (or a value matching the regex) it asks for.
fn mismatch(selector: &VectorSelector, exported: &BTreeMap<String, Vec<Labels>>) -> Option<String> {
    let name = metric_name(selector)?;
    if PROMETHEUS_SERIES.contains(&name.as_str()) {
        return None;
    }
    let Some(found) = exported.get(&name) else {
        return Some(format!("the agent exports no {name}"));
    };
    for matcher in &selector.matchers.matchers {
        if matcher.name == "__name__" || TARGET_LABELS.contains(&matcher.name.as_str()) {
            continue;
        }
        let values: BTreeSet<&str> = found
            .iter()
            .filter_map(|labels| labels.get(&matcher.name).map(String::as_str))
            .collect();
        if values.is_empty() {
            return Some(format!("{name} has no label {}", matcher.name));
        }
        let ok = match &matcher.op {
            MatchOp::Equal => values.contains(matcher.value.as_str()),
            MatchOp::Re(regex) => values.iter().any(|value| regex.is_match(value)),
            // A negative matcher selects whatever else there is: only the label counts.
            MatchOp::NotEqual | MatchOp::NotRe(_) => true,
        };
        if !ok {
            return Some(format!(
                "{name}{{{}}}: no series has such a value (values: {values:?})",
                matcher
            ));
        }
    }
    None
}

#[test]
fn the_series_reader_and_the_selector_check_can_tell_a_mismatch() {
    let exported = series(
        "# HELP x_total x\n# TYPE x_total counter\nx_total{event=\"a\\\"b\",kind=\"k\"} 1\ny 2\n",
    );
    assert_eq!(exported["x_total"][0]["event"], "a\"b");
    assert_eq!(exported["y"], [Labels::new()]);
    let check = |expr: &str| {
        selectors(expr)
            .unwrap()
            .iter()
            .find_map(|selector| mismatch(selector, &exported))
    };
    assert_eq!(
        check("rate(x_total{kind=\"k\", node=~\".*\"}[5m]) + y"),
        None
    );
    assert_eq!(check("x_total{kind=~\"k|z\"} and up == 0"), None);
    assert!(check("z_total").unwrap().contains("no z_total"));
    assert!(
        check("x_total{kind=\"other\"}")
            .unwrap()
            .contains("no series")
    );
    assert!(
        check("x_total{reason=\"k\"}")
            .unwrap()
            .contains("no label reason")
    );
    assert!(
        check("sum(rate(y{kind=~\"k.*\"}[1m]))")
            .unwrap()
            .contains("no label kind")
    );
}

/// Every metric and label value the alerts and the dashboard select is one that a real
/// agent (against the real kube-apiserver, with deploy/'s RBAC), which has served a pod
/// its role, refused an unknown pod and denied an invalid role, exports on `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_and_dashboard_query_selects_what_a_running_agent_exports() {
    let test = "every_alert_and_dashboard_query_selects_what_a_running_agent_exports";
    if !require_root(test) {
        return;
    }
    let Some(plane) = ControlPlane::shared(test) else {
        return;
    };
    let scope = plane.scope("deploy-metrics");
    scope.add_node(&[]).await;
    let team = scope.namespace_name("team");
    scope.namespace(&team, &[]).await;
    let node = Node::new();
    let role = |role| [("iam.amazonaws.com/role", role)];
    let served = scope
        .running_pod(&node, &team, "served", &role("role-a"))
        .await;
    let denied = scope
        .running_pod(&node, &team, "denied", &role("arn:aws:iam::bad"))
        .await;
    // A pod the API server does not know.
    let unknown = node.pod();
    let moto = MotoServer::shared_on(node.address);
    let upstream = FakeImds::start(IpAddr::from([127, 0, 0, 1])).await;
    let (agent, _) = AgentBuilder::new(
        "deploy-metrics",
        &node,
        Peers::new(&scope, &upstream, &moto.endpoint()),
    )
    .args(&["--base-role-arn", "arn:aws:iam::123456789012:role/"])
    .start()
    .await;
    let sts = moto.endpoint();
    let answers = tokio::task::spawn_blocking(move || {
        let path = "/latest/meta-data/iam/security-credentials/";
        let answers = (
            boto3(&served, &sts),
            raw(&denied, "GET", path, &[]),
            raw(&unknown, "GET", path, &[]),
        );
        drop((served, denied, unknown));
        answers
    })
    .await
    .unwrap();
    assert!(answers.0.contains("assumed-role/role-a/"), "{answers:?}");
    assert_eq!(answers.1.0, 404, "{answers:?}");
    assert_ne!(answers.2.0, 200, "{answers:?}");
    let (status, exposition) = agent.admin_get("/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    let exported = series(&exposition);
    let mut problems = Vec::new();
    for (place, query) in queries() {
        for selector in selectors(&query).unwrap() {
            if let Some(problem) = mismatch(&selector, &exported) {
                problems.push(format!("{place}: {problem}\n    in {query}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "queries that select what the agent does not export:\n{}\n\nthe agent's /metrics:\n{exposition}",
        problems.join("\n")
    );
}
