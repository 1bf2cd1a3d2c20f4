pub mod backend;
pub mod check;
pub mod detach;
pub mod explain;
pub mod reload;
pub mod run;
pub mod status;
pub mod top;
