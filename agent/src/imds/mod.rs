//! Client for the Azure Instance Metadata Service (IMDS).
