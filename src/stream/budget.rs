//! The VRAM budget as a hard cap. Every device allocation — resident groups, slots, KV cache,
//! activation workspace, cuBLAS workspace — goes through one [`BudgetAllocator`], which
//! refuses an allocation that would take the total past the budget, and remembers the peak.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use super::size::human_bytes;
use crate::error::{Error, Result};

/// What device memory is for; named in errors and in the breakdown.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Purpose {
    /// A weight group kept on the device for the whole run (its label, e.g. "block 7").
    Resident(String),
    /// Streaming slot `i`.
    Slot(usize),
    KvCache,
    /// Activations of one pass.
    Workspace,
    CublasWorkspace,
    /// Anything else, described.
    Other(String),
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Purpose::Resident(label) => write!(f, "resident {label}"),
            Purpose::Slot(i) => write!(f, "slot {i}"),
            Purpose::KvCache => f.write_str("KV cache"),
            Purpose::Workspace => f.write_str("activation workspace"),
            Purpose::CublasWorkspace => f.write_str("cuBLAS workspace"),
            Purpose::Other(what) => f.write_str(what),
        }
    }
}

/// An allocation refused because it would exceed the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverBudget {
    pub purpose: Purpose,
    /// Bytes asked for.
    pub bytes: usize,
    /// Bytes already allocated.
    pub in_use: usize,
    pub budget: usize,
}

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot allocate {} ({} bytes) for {}: {} of the {} budget are in use, {} free",
            human_bytes(self.bytes),
            self.bytes,
            self.purpose,
            human_bytes(self.in_use),
            human_bytes(self.budget),
            human_bytes(self.budget - self.in_use),
        )
    }
}

impl std::error::Error for OverBudget {}

impl From<OverBudget> for Error {
    fn from(e: OverBudget) -> Error {
        Error::Flag {
            flag: "--vram",
            message: e.to_string(),
        }
    }
}

/// Raw device memory, below the accounting: `cuMemAlloc` on a GPU, host memory in tests.
/// Freeing is the buffer's `Drop`.
pub trait DeviceMemory {
    type Buffer;
    fn alloc(&self, bytes: usize) -> Result<Self::Buffer>;
}

/// The ledger shared by an allocator and its live allocations.
#[derive(Debug, Default)]
struct Ledger {
    in_use: usize,
    peak: usize,
    next_id: u64,
    live: BTreeMap<u64, (Purpose, usize)>,
}

/// The one way to allocate device memory: checks the budget, then asks `M`.
pub struct BudgetAllocator<M: DeviceMemory> {
    memory: M,
    budget: usize,
    ledger: Arc<Mutex<Ledger>>,
}

/// Device memory that counts against the budget until dropped.
pub struct Allocation<B> {
    buffer: B,
    bytes: usize,
    id: u64,
    ledger: Arc<Mutex<Ledger>>,
}

impl<M: DeviceMemory> BudgetAllocator<M> {
    pub fn new(memory: M, budget: usize) -> Self {
        BudgetAllocator {
            memory,
            budget,
            ledger: Arc::default(),
        }
    }

    /// `bytes` of device memory for `purpose`, or an error if the budget would be exceeded
    /// (checked before the device is asked).
    pub fn alloc(&self, purpose: Purpose, bytes: usize) -> Result<Allocation<M::Buffer>> {
        let id = {
            let mut l = self.ledger.lock().expect("ledger lock");
            if bytes > self.budget - l.in_use {
                return Err(OverBudget {
                    purpose,
                    bytes,
                    in_use: l.in_use,
                    budget: self.budget,
                }
                .into());
            }
            // Count it before asking the device, so that concurrent callers cannot overshoot.
            l.in_use += bytes;
            l.peak = l.peak.max(l.in_use);
            l.next_id += 1;
            let id = l.next_id;
            l.live.insert(id, (purpose, bytes));
            id
        };
        match self.memory.alloc(bytes) {
            Ok(buffer) => Ok(Allocation {
                buffer,
                bytes,
                id,
                ledger: self.ledger.clone(),
            }),
            Err(e) => {
                let mut l = self.ledger.lock().expect("ledger lock");
                l.live.remove(&id);
                l.in_use -= bytes;
                Err(e)
            }
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes allocated now.
    pub fn in_use(&self) -> usize {
        self.ledger.lock().expect("ledger lock").in_use
    }

    /// Most bytes ever allocated at once.
    pub fn peak(&self) -> usize {
        self.ledger.lock().expect("ledger lock").peak
    }

    /// A handle that reads this allocator's in-use and peak bytes from elsewhere.
    pub fn tracker(&self) -> BudgetTracker {
        BudgetTracker {
            ledger: self.ledger.clone(),
        }
    }

    /// Live allocations by purpose, bytes summed (e.g. all slots under their own entries).
    pub fn breakdown(&self) -> Vec<(Purpose, usize)> {
        let l = self.ledger.lock().expect("ledger lock");
        let mut by: BTreeMap<Purpose, usize> = BTreeMap::new();
        for (p, b) in l.live.values() {
            *by.entry(p.clone()).or_default() += b;
        }
        by.into_iter().collect()
    }
}

/// Reads an allocator's ledger (see [`BudgetAllocator::tracker`]).
#[derive(Clone)]
pub struct BudgetTracker {
    ledger: Arc<Mutex<Ledger>>,
}

impl BudgetTracker {
    /// Most bytes ever allocated at once.
    pub fn peak(&self) -> usize {
        self.ledger.lock().expect("ledger lock").peak
    }
}

impl<B> Allocation<B> {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl<B> std::ops::Deref for Allocation<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.buffer
    }
}

impl<B> std::ops::DerefMut for Allocation<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.buffer
    }
}

impl<B> Drop for Allocation<B> {
    fn drop(&mut self) {
        let mut l = self.ledger.lock().expect("ledger lock");
        l.live.remove(&self.id);
        l.in_use -= self.bytes;
    }
}

/// Host memory standing in for the device (tests, the CPU copy engine).
#[derive(Clone, Copy, Debug, Default)]
pub struct HeapMemory;

impl DeviceMemory for HeapMemory {
    type Buffer = Vec<u8>;
    fn alloc(&self, bytes: usize) -> Result<Vec<u8>> {
        Ok(vec![0u8; bytes])
    }
}

/// The `--vram` flag: a size, or `auto` (free device memory minus [`AUTO_HEADROOM`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vram {
    Bytes(usize),
    Auto,
}

/// What `--vram auto` leaves free for the driver, other processes and fragmentation.
pub const AUTO_HEADROOM: usize = 512 << 20;

impl Vram {
    pub fn parse(s: &str) -> Result<Vram> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(Vram::Auto);
        }
        super::size::parse_size(s, "--vram").map(Vram::Bytes)
    }

    /// The budget in bytes. `free_device_bytes` is the device's free memory (cuMemGetInfo);
    /// `auto` needs it.
    pub fn resolve(self, free_device_bytes: Option<usize>) -> Result<usize> {
        match (self, free_device_bytes) {
            (Vram::Bytes(b), _) => Ok(b),
            (Vram::Auto, Some(free)) => free
                .checked_sub(AUTO_HEADROOM)
                .filter(|&b| b > 0)
                .ok_or_else(|| Error::Flag {
                    flag: "--vram",
                    message: format!(
                        "auto: the device has {} free, less than the {} headroom that auto leaves",
                        human_bytes(free),
                        human_bytes(AUTO_HEADROOM)
                    ),
                }),
            (Vram::Auto, None) => Err(Error::Flag {
                flag: "--vram",
                message: "auto needs a GPU to ask for its free memory; give a size such as 6GiB"
                    .into(),
            }),
        }
    }
}
