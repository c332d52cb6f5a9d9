# Reference values for tests/test_coding.py: lme4 fits with factors in R's level order.
# Run from the repository root: Rscript scripts/reference/coding_reference.R
# Writes tests/reference/orthodont.csv, tests/reference/hsb82.csv and tests/reference/coding_lme4.json.
suppressPackageStartupMessages({library(lme4); library(nlme); library(mlmRev); library(jsonlite)})
data(Orthodont, package = "nlme")
o <- as.data.frame(Orthodont)
o$Subject <- as.character(o$Subject)
write.csv(o, "tests/reference/orthodont.csv", row.names = FALSE)
h <- as.data.frame(Hsb82)
h$school <- as.character(h$school)
write.csv(h[, c("school", "minrty", "sx", "ses", "mAch", "meanses", "sector", "cses")],
          "tests/reference/hsb82.csv", row.names = FALSE)
fit_info <- function(m, data_levels) {
  list(formula = deparse(formula(m)), reml = isREML(m), loglik = as.numeric(logLik(m)),
       fixef = as.list(fixef(m)), se = as.list(sqrt(diag(as.matrix(vcov(m))))), levels = data_levels,
       lme4 = as.character(packageVersion("lme4")), R = R.version.string)
}
m1 <- lmer(distance ~ age + Sex + (age | Subject), data = Orthodont)
m2 <- lmer(mAch ~ sector + cses + (1 | school), data = Hsb82)
out <- list(orthodont = fit_info(m1, list(Sex = levels(Orthodont$Sex))),
            hsb82 = fit_info(m2, list(sector = levels(Hsb82$sector))))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "tests/reference/coding_lme4.json")
