//! Deployment files: `deploy/check` passes the Kubernetes manifests (`kubernetes-validate
//! --strict`), the Dockerfile (`hadolint`) and `compose.yaml`; the same validators reject a
//! corrupted manifest and a bad Dockerfile, so passing them means something; and every flag and
//! `VOLLEY_*` variable the files give the binary is one `volley <command> --help` lists.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use volley_tests::process::volley_bin;

/// The workspace root (the test crate is `tests/`).
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Run `command`, asserting it succeeds (`ok`) or fails, with its output on a surprise.
fn run(command: &mut Command, ok: bool, what: &str) -> Output {
    let output = command.output().unwrap();
    let (out, err) = (&output.stdout, &output.stderr);
    let (out, err) = (String::from_utf8_lossy(out), String::from_utf8_lossy(err));
    let status = output.status;
    assert_eq!(
        status.success(),
        ok,
        "{what}: {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    output
}

/// PATH with the folders pip installs console scripts to in front, as `deploy/check` sets it.
fn tool_path() -> OsString {
    let script = "import site, sysconfig; print(sysconfig.get_path('scripts')); print(site.USER_BASE + '/bin')";
    let output = run(
        Command::new("python3").args(["-c", script]),
        true,
        "python3",
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let mut dirs: Vec<PathBuf> = text.lines().map(PathBuf::from).collect();
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).unwrap()
}

fn deploy_check() -> Command {
    let mut command = Command::new(root().join("deploy/check"));
    command.current_dir(root());
    command
}

#[test]
fn deploy_files_pass_the_validators() {
    run(&mut deploy_check(), true, "deploy/check");
}

#[test]
fn the_validators_reject_a_broken_manifest() {
    run(
        deploy_check().arg("--install-only"),
        true,
        "deploy/check --install-only",
    );
    let path = tool_path();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("executor.yaml");
    let mut validate = Command::new("kubernetes-validate");
    validate.arg("--strict").arg(&file).env("PATH", &path);
    let manifest = std::fs::read_to_string(root().join("deploy/kubernetes/executor.yaml")).unwrap();
    // The unchanged copy passes, so each failure below is the corruption's.
    std::fs::write(&file, &manifest).unwrap();
    run(&mut validate, true, "the copy of executor.yaml");
    // A string for an integer, an unknown field, a required field missing.
    for (from, to) in [
        ("replicas: 2", "replicas: \"two\""),
        ("terminationGracePeriodSeconds:", "terminationGracePeriod:"),
        ("fieldPath: status.podIP", "field: status.podIP"),
    ] {
        assert!(manifest.contains(from), "executor.yaml has no {from:?}");
        std::fs::write(&file, manifest.replacen(from, to, 1)).unwrap();
        run(&mut validate, false, &format!("executor.yaml with {to:?}"));
    }

    let dockerfile = dir.path().join("Dockerfile");
    std::fs::write(&dockerfile, "FROM debian:latest\nRUN apt-get install foo\n").unwrap();
    let mut hadolint = Command::new("hadolint");
    hadolint
        .arg(&dockerfile)
        .current_dir(&dir)
        .env("PATH", &path);
    let output = run(&mut hadolint, false, "hadolint on a bad Dockerfile");
    let report = String::from_utf8_lossy(&output.stdout);
    for rule in ["DL3007", "DL3008", "DL3015"] {
        assert!(
            report.contains(rule),
            "hadolint did not report {rule}:\n{report}"
        );
    }
}

#[test]
fn deploy_files_use_flags_volley_knows() {
    let bin = volley_bin().unwrap();
    let mut help = String::new();
    for command in ["sql", "scheduler", "executor"] {
        let mut volley = Command::new(&bin);
        let output = run(volley.args([command, "--help"]), true, command);
        help.push_str(&String::from_utf8_lossy(&output.stdout));
    }
    let deploy = root().join("deploy");
    // (file, whether its `--flags` are the binary's: the Dockerfile's are Docker's)
    let mut files = vec![
        (deploy.join("compose.yaml"), true),
        (deploy.join("volley.env.example"), true),
        (deploy.join("Dockerfile"), false),
    ];
    // The plain manifests and their TLS variant (deploy/kubernetes/tls/).
    for dir in [deploy.join("kubernetes"), deploy.join("kubernetes/tls")] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                files.push((path, true));
            }
        }
    }
    let mut unknown = Vec::new();
    for (file, flags) in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let words = line.split(|c: char| !(c.is_ascii_alphanumeric() || "-_".contains(c)));
            for word in words {
                let known = if flags && word.starts_with("--") && !word.starts_with("---") {
                    help.contains(&format!("{word} ")) || help.contains(&format!("{word}\n"))
                } else if word.starts_with("VOLLEY_") {
                    // clap's `[env: NAME=value]`, or `[env: NAME]` for hidden values
                    help.contains(&format!("env: {word}="))
                        || help.contains(&format!("env: {word}]"))
                } else {
                    continue;
                };
                if !known {
                    unknown.push(format!("{}: {word}", file.display()));
                }
            }
        }
    }
    assert!(unknown.is_empty(), "not in `volley --help`: {unknown:#?}");
}

/// The probes the manifests use answer without a token while every other call still needs
/// it: `/healthz` and `/readyz` on the status port, the standard gRPC health service on the
/// scheduler's and the executors' gRPC ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_answer_without_a_token_and_nothing_else_does() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use volley_tests::process::{ProcessCluster, ProcessOptions};
    let token = "probe-test-token";
    let options = ProcessOptions {
        env: vec![("VOLLEY_AUTH_TOKEN".to_string(), token.to_string())],
        client: volley::ClientOptions::with_token(token),
        ..ProcessOptions::default()
    };
    let cluster = ProcessCluster::start_with(1, 1, &[], options)
        .await
        .unwrap();
    for path in ["/healthz", "/readyz", "/api/jobs"] {
        let (status, _) =
            volley_tests::http("GET", format!("{}{path}", cluster.http_url()), None).await;
        let expected = if path == "/api/jobs" { 401 } else { 200 };
        assert_eq!(status, expected, "{path}");
    }
    let mut urls = vec![cluster.url().to_string()];
    urls.extend(
        cluster
            .executor_ports()
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}")),
    );
    for url in urls {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let answer = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"))
            .into_inner();
        assert_eq!(answer.status, ServingStatus::Serving as i32, "{url}");
    }
    // The scheduler's own service still refuses a call without the token.
    let mut scheduler = volley_core::protobuf::scheduler_grpc_client::SchedulerGrpcClient::new(
        tonic::transport::Endpoint::from_shared(cluster.url().to_string())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let refused = scheduler
        .get_cluster_state(volley_core::protobuf::GetClusterStateParams::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
}
