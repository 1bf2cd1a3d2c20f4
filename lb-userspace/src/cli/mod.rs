pub mod backend;
pub mod check;
pub mod detach;
pub mod reload;
pub mod run;
pub mod status;
