//! A server role of this binary (`serve`, `fleet`) as a child process, for the benchmarks that
//! drive it over HTTP: started on a free loopback port, waited for until `/ready`, stopped when
//! dropped (the fleet launcher stops its members on SIGTERM).

use anyhow::{bail, Context, Result};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct ServerProcess {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    role: String,
}

impl ServerProcess {
    /// Starts `dsv3-worker ROLE --port PORT`, with what `configure` adds to the command.
    pub fn start(role: &str, configure: impl FnOnce(&mut Command)) -> Result<ServerProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([role, "--port", &port.to_string()]);
        configure(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("starting {role}"))?;
        Ok(ServerProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            role: role.to_string(),
        })
    }

    /// Polls `/ready` until it answers 200; an error if the process exits first or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}) before it was ready", self.role);
            }
            if ureq::get(&format!("{}/ready", self.base)).call().is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("{} did not become ready in {} s", self.role, timeout.as_secs())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}
