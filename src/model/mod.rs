//! Model architectures, written once over the [`Backend`](crate::backend::Backend) interface.
//! A model describes itself as an ordered list of weight groups and asks for each group's
//! weights as it runs; where those weights live is not its business.

mod config;
mod llama;
pub mod vae;

pub use config::{Arch, Llama3RopeScaling, LlamaConfig};
pub use llama::{Llama, Logits, Segment, MLP_CHUNK_ROWS};

use crate::checkpoint::{Checkpoint, HostTensor};
use crate::error::Result;

/// What a group is in the pass order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    /// Token embedding table.
    Embedding,
    /// One decoder block.
    Block(usize),
    /// Final norm and the language-model head.
    Head,
}

/// A tensor the model needs, with the shape it must have.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// A set of weights used together, in pass order.
#[derive(Clone, Debug)]
pub struct WeightGroup {
    pub kind: GroupKind,
    pub tensors: Vec<TensorSpec>,
}

impl WeightGroup {
    pub fn label(&self) -> String {
        match self.kind {
            GroupKind::Embedding => "embedding".into(),
            GroupKind::Block(i) => format!("block {i}"),
            GroupKind::Head => "head".into(),
        }
    }

    /// Bytes of this group's tensors in `ckpt`.
    pub fn bytes(&self, ckpt: &Checkpoint) -> usize {
        self.tensors
            .iter()
            .filter_map(|t| ckpt.tensors.get(&t.name))
            .map(|t| t.bytes().len())
            .sum()
    }
}

/// Hands the model the weights of one group at a time. The CPU path keeps every group
/// resident; the streaming engine hands out weights that it copied into a slot.
pub trait Weights<W> {
    /// The weights of group `index`, in the order of its `tensors`.
    fn group(&mut self, index: usize) -> Result<&[W]>;

    /// In how many parts group `index` comes when it is too large to be on the device at
    /// once (the head of a large vocabulary streamed in pieces). Each part is a block of rows
    /// of the group's last tensor, in order; 1 when the group comes whole.
    fn parts(&mut self, index: usize) -> Result<usize> {
        let _ = index;
        Ok(1)
    }

    /// Part `part` of group `index` (see [`parts`](Self::parts)), in the order of its
    /// `tensors`: `None` for a tensor that lies in another part; the last tensor is the block
    /// of its rows in this part. Ask for the parts in order.
    fn part(&mut self, index: usize, part: usize) -> Result<Vec<Option<&W>>> {
        debug_assert_eq!(part, 0, "a whole group has one part");
        Ok(self.group(index)?.iter().map(Some).collect())
    }

    /// The pass has queued all its work on these weights (the streaming engine frees the last
    /// slot for the next pass's prefetch).
    fn finish_pass(&mut self) -> Result<()> {
        Ok(())
    }
}

impl<W, T: Weights<W> + ?Sized> Weights<W> for Box<T> {
    fn group(&mut self, index: usize) -> Result<&[W]> {
        (**self).group(index)
    }
    fn parts(&mut self, index: usize) -> Result<usize> {
        (**self).parts(index)
    }
    fn part(&mut self, index: usize, part: usize) -> Result<Vec<Option<&W>>> {
        (**self).part(index, part)
    }
    fn finish_pass(&mut self) -> Result<()> {
        (**self).finish_pass()
    }
}

/// Every group made ready up front.
pub struct ResidentWeights<W> {
    groups: Vec<Vec<W>>,
}

impl<W> ResidentWeights<W> {
    pub fn load(
        ckpt: &Checkpoint,
        groups: &[WeightGroup],
        mut make: impl FnMut(&HostTensor) -> Result<W>,
    ) -> Result<Self> {
        let groups = groups
            .iter()
            .map(|g| {
                g.tensors
                    .iter()
                    .map(|t| make(ckpt.tensor(&t.name)?))
                    .collect()
            })
            .collect::<Result<_>>()?;
        Ok(ResidentWeights { groups })
    }
}

impl<W> Weights<W> for ResidentWeights<W> {
    fn group(&mut self, index: usize) -> Result<&[W]> {
        Ok(&self.groups[index])
    }
}

/// Check that `ckpt` holds every tensor its model needs, with the expected shape.
pub fn check_tensors(ckpt: &Checkpoint) -> Result<()> {
    let model = Llama::new(ckpt.config.clone());
    for group in model.groups() {
        for spec in &group.tensors {
            let t = ckpt.tensor(&spec.name)?;
            t.expect_shape(&spec.shape)?;
        }
    }
    Ok(())
}
