//! nats-servers with JetStream on loopback for the tests (`scripts/test.sh`
//! installs the binary): one alone, or a cluster of three.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kami::storage::jetstream::{JetStream, JetStreamOptions};

pub fn nats_binary() -> Option<PathBuf> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Returns the server binary, or `None` (and says so) when it is missing outside CI.
pub fn nats_or_skip() -> Option<PathBuf> {
    let found = nats_binary();
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "nats-server is missing in CI (scripts/test.sh installs it)");
        eprintln!("SKIPPED: nats-server not installed (apt-get install nats-server)");
    }
    found
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// nats-servers with JetStream on loopback ports, their stores in a temp dir: one
/// alone, or a cluster of three (the stream then keeps three copies).
pub struct Nats {
    binary: PathBuf,
    children: Vec<Option<Child>>,
    pub ports: Vec<u16>,
    route_ports: Vec<u16>,
    dir: tempfile::TempDir,
    max_payload: Option<usize>,
}

impl Nats {
    pub fn start(binary: PathBuf, max_payload: Option<usize>) -> Nats {
        Nats::start_n(binary, 1, max_payload)
    }

    pub fn start_n(binary: PathBuf, n: usize, max_payload: Option<usize>) -> Nats {
        let mut nats = Nats::unstarted(binary, n, max_payload);
        for i in 0..n {
            nats.restart(i);
        }
        nats
    }

    /// Ports and stores chosen, no server started yet ([`Nats::restart`] starts one).
    pub fn unstarted(binary: PathBuf, n: usize, max_payload: Option<usize>) -> Nats {
        Nats {
            binary,
            children: (0..n).map(|_| None).collect(),
            ports: (0..n).map(|_| free_port()).collect(),
            route_ports: (0..n).map(|_| free_port()).collect(),
            dir: tempfile::tempdir().unwrap(),
            max_payload,
        }
    }

    pub fn restart(&mut self, i: usize) {
        assert!(self.children[i].is_none());
        let config = self.dir.path().join(format!("n{i}.conf"));
        let mut text = format!(
            "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: {:?} }}\n",
            self.ports[i],
            self.store(i)
        );
        if let Some(max) = self.max_payload {
            text.push_str(&format!("max_payload: {max}\n"));
        }
        if self.ports.len() > 1 {
            // `no_advertise`: clients reach the servers only at the addresses they
            // were given (a `Relay` in front of them stays the only way in).
            let routes: Vec<String> = self.route_ports.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
            text.push_str(&format!(
                "cluster {{ name: kami, listen: 127.0.0.1:{}, routes: [{}], no_advertise: true }}\n",
                self.route_ports[i],
                routes.join(", ")
            ));
        }
        std::fs::write(&config, text).unwrap();
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.children[i] = Some(child);
    }

    /// kill -9 of server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn options(&self) -> JetStreamOptions {
        JetStreamOptions {
            urls: self.ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect(),
            stream: "KAMITEST".into(),
            replicas: self.ports.len(),
            timeout: Duration::from_secs(3),
            ..JetStreamOptions::default()
        }
    }

    /// Connects once the servers accept JetStream requests (a cluster first elects
    /// its leaders).
    pub async fn connect(&self) -> JetStream {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match JetStream::connect(self.options()).await {
                Ok(js) => return js,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("nats-servers on ports {:?} never served JetStream: {e}", self.ports),
            }
        }
    }

    pub fn store(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("store-n{i}"))
    }

    /// The Raft leader of `stream` and whether every other replica is current,
    /// asked of the servers in `live`.
    pub async fn stream_cluster(&self, stream: &str, live: &[usize]) -> Option<(usize, bool)> {
        let urls: Vec<String> = live.iter().map(|&i| format!("nats://127.0.0.1:{}", self.ports[i])).collect();
        let client =
            async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2)).connect(urls).await.ok()?;
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(stream).await.ok()?;
        let info = stream.info().await.ok()?;
        let cluster = info.cluster.as_ref()?;
        let leader = cluster.leader.as_ref()?.strip_prefix('n')?.parse().ok()?;
        let current =
            cluster.replicas.len() + 1 == self.ports.len() && cluster.replicas.iter().all(|p| p.current && !p.offline);
        Some((leader, current))
    }

    /// Waits (up to a minute) until `stream` has a leader among `live`, with every
    /// replica current when `all_current`; returns the leader.
    pub async fn settled(&self, stream: &str, live: &[usize], all_current: bool) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((leader, current)) = self.stream_cluster(stream, live).await {
                if live.contains(&leader) && (current || !all_current) {
                    return leader;
                }
            }
            assert!(Instant::now() < deadline, "{stream} never settled on servers {live:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// A TCP relay in front of one nats-server that a test can cut (every connection
/// through it closed, new ones refused) and heal: a network partition between one
/// client and the servers, on loopback.
pub struct Relay {
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    pub fn to(target: u16) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (o, c) = (open.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !o.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else { continue };
                let mut kept = c.lock().unwrap();
                for s in [&client, &server] {
                    kept.extend(s.try_clone().ok());
                }
                drop(kept);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, open, conns }
    }

    /// Closes every connection through the relay and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
