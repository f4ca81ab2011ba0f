//! Which NUMA node holds the host pages that stream, and moving them to the GPU's.
//!
//! A host→device copy reads host memory from the PCIe root's socket; pages on another socket
//! cross the socket interconnect first. The encodings are written by the encoder's threads
//! wherever they run, so on a two-socket host about half of them lie on the far node. Whether
//! that is what slows a pass's copies below the link's figure at load is not yet measured
//! (bench/NOTES.md, stop 37): `FERRY_HOST_NODE` turns the move on for measuring.

use std::path::Path;

use crate::error::{Error, Result};

/// Where `FERRY_HOST_NODE` asks the streamed host pages to be: `gpu` (the GPU's node, as
/// sysfs tells it), a node number, or nowhere (unset or `off`: left where they are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostNode {
    Gpu,
    Node(usize),
}

impl HostNode {
    /// The choice `FERRY_HOST_NODE` makes; `None` when unset or `off`.
    pub fn from_env() -> Result<Option<HostNode>> {
        match std::env::var("FERRY_HOST_NODE") {
            Err(_) => Ok(None),
            Ok(v) => Self::parse(&v),
        }
    }

    /// `gpu`, a node number, or `off`.
    pub fn parse(v: &str) -> Result<Option<HostNode>> {
        match v.trim() {
            "" | "off" => Ok(None),
            "gpu" => Ok(Some(HostNode::Gpu)),
            n => n
                .parse()
                .map(|n| Some(HostNode::Node(n)))
                .map_err(|_| Error::Flag {
                    flag: "FERRY_HOST_NODE",
                    message: format!("{v:?}: expected `gpu`, a NUMA node number, or `off`"),
                }),
        }
    }
}

/// The NUMA node of the PCI device `bus_id` (as `cuDeviceGetPCIBusId` writes it, e.g.
/// `0000:1A:00.0`) under the sysfs root `sys` (`/sys` on a live system); `None` where the
/// host reports none (`-1`: one node, or a firmware that does not say) or the file is absent.
pub fn pci_node(sys: &Path, bus_id: &str) -> Option<usize> {
    let path = sys
        .join("bus/pci/devices")
        .join(bus_id.trim().to_ascii_lowercase())
        .join("numa_node");
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// How many NUMA nodes the host has online (1 where sysfs does not say).
pub fn online_nodes(sys: &Path) -> usize {
    std::fs::read_dir(sys.join("devices/system/node"))
        .map(|dir| {
            dir.flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.strip_prefix("node")
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0)
        .max(1)
}

/// Move the pages under `bytes` to NUMA node `node` (those already there stay), then leave
/// the range under the default policy again. `bytes` must be memory this process mapped
/// (page-aligned mappings; the range is widened to whole pages). Pages another process
/// also maps, or that the node has no room for, stay where they are: the move is best
/// effort, an error only when the kernel refuses the request itself (no such node).
#[cfg(target_os = "linux")]
pub fn move_to_node(bytes: &[u8], node: usize) -> Result<()> {
    const MPOL_DEFAULT: libc::c_long = 0;
    const MPOL_BIND: libc::c_long = 2;
    const MPOL_MF_MOVE: libc::c_long = 1 << 1;
    if bytes.is_empty() {
        return Ok(());
    }
    let bits = 8 * std::mem::size_of::<libc::c_ulong>();
    if node >= 16 * bits {
        return Err(Error::Device(format!(
            "NUMA node {node}: more than this build's {} nodes",
            16 * bits
        )));
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let start = bytes.as_ptr() as usize & !(page - 1);
    let len = (bytes.as_ptr() as usize + bytes.len() - start).div_ceil(page) * page;
    let mut mask = [0 as libc::c_ulong; 16];
    mask[node / bits] = 1 << (node % bits);
    let mbind = |mode: libc::c_long, mask: *const libc::c_ulong, flags: libc::c_long| {
        // SAFETY: mbind reads `mask` (16 words, `16 * bits` nodes) and changes only the
        // placement and policy of the pages in [start, start + len), which lie in mappings
        // of this process; it never changes their contents.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                start,
                len,
                mode,
                mask,
                (16 * bits + 1) as libc::c_ulong,
                flags,
            )
        };
        match rc {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    };
    let failed = |e: std::io::Error| {
        Error::Device(format!(
            "moving {len} bytes of host memory to NUMA node {node}: {e}"
        ))
    };
    mbind(MPOL_BIND, mask.as_ptr(), MPOL_MF_MOVE).map_err(failed)?;
    mbind(MPOL_DEFAULT, std::ptr::null(), 0).map_err(failed)
}

/// Not Linux: nothing to move.
#[cfg(not(target_os = "linux"))]
pub fn move_to_node(_bytes: &[u8], _node: usize) -> Result<()> {
    Ok(())
}

/// The NUMA nodes of the pages under `bytes`, as `/proc/self/numa_maps` counts them for the
/// mappings that hold them (node → pages); for tests and notes.
pub fn nodes_of(bytes: &[u8]) -> Vec<(usize, usize)> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/numa_maps") else {
        return Vec::new();
    };
    let at = bytes.as_ptr() as usize;
    let mut out: Vec<(usize, usize)> = Vec::new();
    for line in maps.lines() {
        let mut words = line.split_whitespace();
        let Some(start) = words.next().and_then(|w| usize::from_str_radix(w, 16).ok()) else {
            continue;
        };
        // A mapping's line names its start only: the one holding `bytes` starts at or below
        // it and is the last such line (the lines are in address order).
        if start > at {
            break;
        }
        out.clear();
        for w in words {
            let Some((n, pages)) = w.strip_prefix('N').and_then(|w| w.split_once('=')) else {
                continue;
            };
            if let (Ok(n), Ok(pages)) = (n.parse(), pages.parse()) {
                out.push((n, pages));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_reads_gpu_a_node_or_off_and_names_a_bad_one() {
        assert_eq!(HostNode::parse("gpu").unwrap(), Some(HostNode::Gpu));
        assert_eq!(HostNode::parse(" 1 ").unwrap(), Some(HostNode::Node(1)));
        assert_eq!(HostNode::parse("off").unwrap(), None);
        let e = HostNode::parse("near").unwrap_err().to_string();
        assert!(
            e.contains("FERRY_HOST_NODE") && e.contains("\"near\"") && e.contains("`gpu`"),
            "{e}"
        );
    }

    #[test]
    fn a_device_node_comes_from_sysfs_and_minus_one_is_none() {
        let dir = std::env::temp_dir().join(format!("ferry-host-node-{}", std::process::id()));
        let dev = |id: &str, node: &str| {
            let d = dir.join("bus/pci/devices").join(id);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("numa_node"), node).unwrap();
        };
        dev("0000:1a:00.0", "1\n");
        dev("0000:2b:00.0", "-1\n");
        for n in ["node0", "node1", "possible"] {
            std::fs::create_dir_all(dir.join("devices/system/node").join(n)).unwrap();
        }
        // The driver writes the bus id in capitals; sysfs names it in lower case.
        assert_eq!(pci_node(&dir, "0000:1A:00.0"), Some(1));
        assert_eq!(pci_node(&dir, "0000:2B:00.0"), None);
        assert_eq!(pci_node(&dir, "0000:3C:00.0"), None);
        assert_eq!(online_nodes(&dir), 2);
        assert_eq!(online_nodes(&dir.join("nowhere")), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn pages_moved_to_a_node_are_on_it_with_their_bytes() {
        let len = 64 << 12;
        let mut map = memmap2::MmapMut::map_anon(len).unwrap();
        for (i, b) in map.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let map = map.make_read_only().unwrap();
        move_to_node(&map[100..len - 100], 0).unwrap();
        let nodes = nodes_of(&map);
        assert_eq!(nodes, vec![(0, 64)], "pages by node after the move");
        assert!(map
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i * 7 % 251) as u8));
        let e = move_to_node(&map, 4096).unwrap_err().to_string();
        assert!(e.contains("NUMA node 4096"), "{e}");
    }
}
