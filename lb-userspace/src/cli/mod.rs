pub mod check;
pub mod report;
pub mod run;
