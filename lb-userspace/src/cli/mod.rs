pub mod backend;
pub mod check;
pub mod reload;
pub mod run;
pub mod status;
