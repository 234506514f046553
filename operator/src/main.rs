//! `dsv3-operator crd` prints the CRD; `dsv3-operator plan --file CR.yaml` prints what the
//! operator would apply for a CR; `dsv3-operator run` runs the controller.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dsv3_operator::controller::{self, RunOptions};

#[derive(Parser)]
#[command(
    name = "dsv3-operator",
    version,
    about = "Kubernetes operator for DeepSeekV3Deployment fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the DeepSeekV3Deployment CustomResourceDefinition as YAML.
    Crd,
    /// Print, as a YAML stream, every object the operator would apply for the
    /// DeepSeekV3Deployments in a file (a dry run; nothing is sent to a cluster).
    Plan {
        /// The YAML file (`-` for standard input).
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// Run the controller.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "DSV3_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the /metrics and /health endpoint.
    #[arg(long, env = "DSV3_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader through a Lease (needed when more than one replica runs).
    #[arg(long, env = "DSV3_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, default_value = "dsv3-operator-leader")]
    lease_name: String,
    /// Namespace of the leader Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Identity in the Lease and in Events (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Fleets reconciled at the same time.
    #[arg(long, default_value_t = 4)]
    concurrency: u16,
    /// Log format: text or json.
    #[arg(long, env = "DSV3_LOG_FORMAT", default_value = "json")]
    log_format: String,
}

/// Writes `text` to standard output; a closed pipe (`| head`) is not an error worth a panic.
fn print(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsv3-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match dsv3_operator::crd_yaml() {
            Ok(y) => print(&y),
            Err(e) => {
                eprintln!("dsv3-operator: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Plan { file } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
            } else {
                std::fs::read_to_string(&file)
            };
            let text = match text {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("dsv3-operator: cannot read {}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            match dsv3_operator::dry_run::plan_yaml(&text) {
                Ok(yaml) => print(&yaml),
                Err(e) => {
                    eprintln!("dsv3-operator: {}: {e}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            init_tracing(&args.log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("dsv3-operator: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let identity = args.identity.clone().unwrap_or_else(|| {
                std::env::var("HOSTNAME").unwrap_or_else(|_| format!("dsv3-operator-{}", std::process::id()))
            });
            let opts = RunOptions {
                namespace: args.namespace,
                metrics_addr: args.metrics_addr,
                leader_elect: args.leader_elect,
                lease_name: args.lease_name,
                lease_namespace: args.lease_namespace,
                identity,
                concurrency: args.concurrency.max(1),
            };
            match runtime.block_on(controller::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "operator stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
