//! Case 3: HTTP/2 (h2c) with 100 concurrent streams, Trellis against HAProxy's
//! h2 mode, with h2load. Runs only once the sidecar speaks h2c.

use super::Sizes;
use crate::peers::Env;
use crate::report::Section;

pub fn run(env: &Env, _sizes: &Sizes) -> Section {
    let title = "Case 3: HTTP/2 (h2c), 100 concurrent streams";
    let speaks_h2c = std::process::Command::new(env.bin("sidecar"))
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("h2c"));
    let why = if speaks_h2c {
        "the sidecar's help mentions h2c, but the harness does not drive HTTP/2 yet"
    } else {
        "the sidecar does not speak HTTP/2 yet (its outbound listener is HTTP/1.1 only; HTTP/2 is the next \
         issue). The case will compare `h2load -c 1 -m 100` through the sidecar against HAProxy in h2 mode \
         once it does"
    };
    Section { title: title.into(), body: format!("**Not run:** {why}.\n") }
}
