//! The strategy lab: peer strategies, provider workloads and the report (being built).
