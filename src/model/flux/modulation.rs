//! Flux's modulation computed once for a schedule. Every block's modulation linears
//! (`norm1.linear`, `norm1_context.linear`, the single blocks' `norm.linear`) and
//! `norm_out.linear` act on `silu(temb)`, and `temb` on the σ, the guidance scale and CLIP's
//! pooled embedding alone, so for the σ of every step and the samples' guidance and pooled
//! embeddings their outputs can be computed in one pass before the steps
//! ([`FluxModulation::table`]); the steps then run a [`Flux`](super::Flux) made with
//! [`Flux::precomputed`](super::Flux::precomputed), whose groups leave those weights (3.3 B
//! parameters, 28 % of Flux.1-dev's) out, and take the vectors from the [`ModulationTable`].
//!
//! The table holds the same bits as a pass computes: both embed each distinct condition as
//! one row (`[1, dim]`) through the same linears, and a step uploads the rows the backend
//! handed back (bf16 on the GPU, widened exactly to f32 and narrowed exactly again).

use super::{
    linear_specs, time_text_embed, time_text_specs, Condition, Conditions, FluxConfig, IMAGE_NAMES,
    TEXT_NAMES, T_FREQ_DIM,
};
use crate::backend::dit::DitOps;
use crate::error::{Error, Result};
use crate::model::mmdit::append_outputs;
use crate::model::{Architecture, Bound, PassCost, PassShape, WeightGroup, Weights};

/// The model of a Flux DiT's conditioning-only weights: `time_text_embed`, each block's
/// modulation linears, `norm_out.linear`, one group each.
pub struct FluxModulation {
    pub config: FluxConfig,
    groups: Vec<WeightGroup>,
}

/// What an entry of the table was made for.
#[derive(Clone, Debug)]
struct Key {
    sigma: f32,
    guidance: Option<f32>,
    pooled: Vec<f32>,
}

impl Key {
    fn condition(&self) -> Condition<'_> {
        Condition {
            sigma: self.sigma,
            guidance: self.guidance,
            pooled: &self.pooled,
        }
    }
}

/// The modulation vectors of every block and the final norm for each (σ, guidance, pooled
/// embedding) of a schedule's samples.
#[derive(Clone, Debug)]
pub struct ModulationTable {
    dim: usize,
    double: usize,
    single: usize,
    /// Each condition and its vectors: double block 0's image stream (`6·dim`), its text
    /// stream (`6·dim`), double block 1's, …, single block 0's (`3·dim`), …, then
    /// `norm_out`'s (`2·dim`).
    entries: Vec<(Key, Vec<f32>)>,
}

/// One condition's vectors.
pub(super) struct Entry<'t> {
    dim: usize,
    double: usize,
    values: &'t [f32],
}

impl Entry<'_> {
    /// Double block `block`'s vectors for stream `stream` (0 the image, 1 the text), `6·dim`.
    pub fn double(&self, block: usize, stream: usize) -> &[f32] {
        let w = 6 * self.dim;
        let start = (2 * block + stream) * w;
        &self.values[start..start + w]
    }

    /// Single block `block`'s shift, scale and gate, `3·dim`.
    pub fn single(&self, block: usize) -> &[f32] {
        let w = 3 * self.dim;
        let start = 12 * self.dim * self.double + block * w;
        &self.values[start..start + w]
    }

    /// `norm_out`'s scale and shift, `2·dim`.
    pub fn norm_out(&self) -> &[f32] {
        &self.values[self.values.len() - 2 * self.dim..]
    }
}

impl ModulationTable {
    /// The σ of each entry, in the order made (a σ once per distinct guidance and pooled
    /// embedding).
    pub fn sigmas(&self) -> impl Iterator<Item = f32> + '_ {
        self.entries.iter().map(|(k, _)| k.sigma)
    }

    /// Entries: one per distinct (σ, guidance, pooled embedding).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Host bytes the table takes.
    pub fn bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|(k, v)| (v.len() + k.pooled.len()) * 4)
            .sum()
    }

    /// The entries of `conditions` for a DiT of `config`.
    pub(super) fn entries(
        &self,
        config: &FluxConfig,
        conditions: &Conditions<'_>,
    ) -> Result<Vec<Entry<'_>>> {
        let bad = |message: String| Error::Flag {
            flag: "modulation table",
            message,
        };
        let shape = (self.dim, self.double, self.single);
        let want = (config.dim(), config.num_layers, config.num_single_layers);
        if shape != want {
            return Err(bad(format!(
                "made for {} double and {} single blocks of width {}; expected {} and {} of {} (another model's table)",
                self.double, self.single, self.dim, want.1, want.2, want.0
            )));
        }
        conditions
            .values
            .iter()
            .map(|cond| {
                let found = self.entries.iter().find(|(k, _)| k.condition().same(cond));
                match found {
                    Some((_, values)) => Ok(Entry {
                        dim: self.dim,
                        double: self.double,
                        values,
                    }),
                    None => {
                        let guidance = match cond.guidance {
                            Some(g) => format!(", guidance {g}"),
                            None => String::new(),
                        };
                        let pooled_known = self
                            .entries
                            .iter()
                            .any(|(k, _)| k.condition().same(&Condition { sigma: k.sigma, guidance: k.guidance, pooled: cond.pooled }));
                        Err(bad(format!(
                            "holds no vectors for σ = {}{guidance}{}; expected one of the σ it was made for ({}) with the same guidance and pooled text embeddings",
                            cond.sigma,
                            if pooled_known { "" } else { " and this pooled text embedding" },
                            self.sigmas().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
                        )))
                    }
                }
            })
            .collect()
    }
}

impl FluxModulation {
    pub fn new(config: FluxConfig) -> FluxModulation {
        let dim = config.dim();
        let mut te = Vec::new();
        time_text_specs(&mut te, &config);
        let mut groups = vec![WeightGroup::new("time_text_embed", te)];
        for i in 0..config.num_layers {
            let mut t = Vec::new();
            for n in [&IMAGE_NAMES, &TEXT_NAMES] {
                let name = format!("transformer_blocks.{i}.{}", n.modulation);
                linear_specs(&mut t, name, 6 * dim, dim);
            }
            groups.push(WeightGroup::new(format!("double block {i} modulation"), t));
        }
        for i in 0..config.num_single_layers {
            let mut t = Vec::new();
            let name = format!("single_transformer_blocks.{i}.norm.linear");
            linear_specs(&mut t, name, 3 * dim, dim);
            groups.push(WeightGroup::new(format!("single block {i} modulation"), t));
        }
        let mut last = Vec::new();
        linear_specs(&mut last, "norm_out.linear".into(), 2 * dim, dim);
        groups.push(WeightGroup::new("norm_out modulation", last));
        FluxModulation { config, groups }
    }

    /// The vectors for each of `sigmas` (the pipeline's `timestep / 1000` of every step)
    /// with each of the samples' `pooled` embeddings (`[pooled_projection_dim]` each) at
    /// `guidance` (the pipeline's guidance scale, for a model with `guidance_embeds`; `None`
    /// without): one entry per distinct combination, each weight asked for once. A pass then
    /// finds a sample's vectors by its σ, guidance and pooled embedding, bit for bit.
    pub fn table<B: DitOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        sigmas: &[f32],
        guidance: Option<f32>,
        pooled: &[&[f32]],
    ) -> Result<ModulationTable> {
        let c = &self.config;
        let dim = c.dim();
        let bad = |message: String| Error::Flag {
            flag: "modulation table",
            message,
        };
        if sigmas.is_empty() || pooled.is_empty() {
            return Err(bad(format!(
                "{} σ and {} pooled text embeddings given; expected one σ per step and one embedding per sample",
                sigmas.len(),
                pooled.len()
            )));
        }
        if let Some(p) = pooled.iter().find(|p| p.len() != c.pooled_projection_dim) {
            return Err(Error::Shape {
                tensor: "pooled text embedding".into(),
                expected: vec![c.pooled_projection_dim],
                found: vec![p.len()],
            });
        }
        match (c.guidance_embeds, guidance) {
            (true, None) => {
                return Err(bad(
                    "no guidance given; this Flux DiT embeds the guidance scale (guidance_embeds)"
                        .into(),
                ))
            }
            (false, Some(_)) => {
                return Err(bad(
                    "guidance given to a Flux DiT without guidance_embeds; expected none".into(),
                ))
            }
            _ => {}
        }
        let conditions = Conditions::of(sigmas.iter().flat_map(|&sigma| {
            pooled.iter().map(move |&p| Condition {
                sigma,
                guidance,
                pooled: p,
            })
        }));
        let per_entry = (12 * c.num_layers + 3 * c.num_single_layers + 2) * dim;
        let mut entries: Vec<(Key, Vec<f32>)> = conditions
            .values
            .iter()
            .map(|cond| {
                let key = Key {
                    sigma: cond.sigma,
                    guidance: cond.guidance,
                    pooled: cond.pooled.to_vec(),
                };
                (key, Vec::with_capacity(per_entry))
            })
            .collect();
        let silu = {
            let w = Bound::new(&self.groups[0], weights.group(0)?);
            let te = time_text_embed(&w, c.guidance_embeds);
            conditions
                .values
                .iter()
                .map(|cond| te.embed(backend, cond).map(|(_, silu)| silu))
                .collect::<Result<Vec<_>>>()?
        };
        // Every condition's output of the linears `names` of group `g`, appended to its
        // entry.
        let mut append = |g: usize, names: &[String], ws: &[B::Weight]| {
            let w = Bound::new(&self.groups[g], ws);
            append_outputs(backend, &silu, &w, names, &mut entries)
        };
        for i in 0..c.num_layers {
            let names = [&IMAGE_NAMES, &TEXT_NAMES]
                .map(|n| format!("transformer_blocks.{i}.{}", n.modulation));
            append(1 + i, &names, weights.group(1 + i)?)?;
        }
        for i in 0..c.num_single_layers {
            let g = 1 + c.num_layers + i;
            let names = [format!("single_transformer_blocks.{i}.norm.linear")];
            append(g, &names, weights.group(g)?)?;
        }
        let last = 1 + c.num_layers + c.num_single_layers;
        append(last, &["norm_out.linear".to_string()], weights.group(last)?)?;
        weights.finish_pass()?;
        Ok(ModulationTable {
            dim,
            double: c.num_layers,
            single: c.num_single_layers,
            entries,
        })
    }
}

impl super::Flux {
    /// Parameters of the weights a [`Modulation::Precomputed`](super::Modulation) pass
    /// leaves out.
    pub fn modulation_params(&self) -> usize {
        FluxModulation::new(self.config.clone())
            .groups
            .iter()
            .flat_map(|g| &g.tensors)
            .map(|t| t.numel())
            .sum()
    }
}

impl Architecture for FluxModulation {
    /// `time_text_embed`, each block's modulation, `norm_out`'s.
    fn groups(&self) -> &[WeightGroup] {
        &self.groups
    }

    /// `shape.batch` is the number of entries (one row each).
    fn pass_cost(&self, shape: PassShape) -> PassCost {
        let c = &self.config;
        let (dim, n) = (c.dim() as f64, shape.batch.max(1) as f64);
        let time = T_FREQ_DIM as f64 * dim + dim * dim;
        let mlps = (1.0 + c.guidance_embeds as u8 as f64) * time
            + c.pooled_projection_dim as f64 * dim
            + dim * dim;
        let mut flops = vec![n * 2.0 * mlps];
        flops.extend(std::iter::repeat_n(
            n * 2.0 * 2.0 * 6.0 * dim * dim,
            c.num_layers,
        ));
        flops.extend(std::iter::repeat_n(
            n * 2.0 * 3.0 * dim * dim,
            c.num_single_layers,
        ));
        flops.push(n * 2.0 * 2.0 * dim * dim);
        // Every entry's outputs of a group (bf16 on the GPU) and their joined copy, beside
        // the entry's silu(temb); 1 MiB for the rest.
        let workspace = shape.batch.max(1) * (3 * 6 * c.dim() + c.dim()) * 2 * 2;
        PassCost {
            flops,
            workspace: workspace + (1 << 20),
            cache: 0,
        }
    }
}
