//! Topology files for the topology and plan tests, built from one spelling of each table
//! so every test starts from the same text and changes only what it is about.

/// A `[[switch]]` table.
pub fn switch(name: &str, dpid: u64) -> String {
    format!("\n[[switch]]\nname = \"{name}\"\ndpid = {dpid}\n")
}

/// A `[[host]]` with one `eth0` interface on `switch`.
pub fn host(name: &str, switch: &str, address: &str, mac: &str) -> String {
    format!(
        "\n[[host]]\nname = \"{name}\"\n[[host.iface]]\nname = \"eth0\"\nswitch = \"{switch}\"\naddress = \"{address}\"\nmac = \"{mac}\"\n"
    )
}

/// A `[[link]]` between two switches.
pub fn link(a: &str, b: &str) -> String {
    format!("\n[[link]]\na = \"{a}\"\nb = \"{b}\"\n")
}

/// The smallest valid file: switch `s1` with host `a` (198.18.1.1/24, 02:00:00:00:00:01).
pub fn minimal() -> String {
    switch("s1", 1) + &host("a", "s1", "198.18.1.1/24", "02:00:00:00:00:01")
}

/// [`minimal`] plus host `b` (198.18.1.2/24, 02:00:00:00:00:02) on the same switch.
pub fn two_hosts() -> String {
    minimal() + &host("b", "s1", "198.18.1.2/24", "02:00:00:00:00:02")
}
