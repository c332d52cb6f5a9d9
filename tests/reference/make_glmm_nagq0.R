# Reference values for lme4's nAGQ = 0 fits (θ optimised with β inside PIRLS), on the data sets
# shipped with jaxmixed. Run: cd tests/reference && Rscript make_glmm_nagq0.R
# Writes glmm_nagq0.json. lme4 1.1-31 (Debian's r-cran-lme4), R 4.2.2.
# The reference is the fit with PIRLS converged tightly (tolPwrss = 1e-12): with lme4's default
# tolerance (1e-7) the reported log likelihood is that of modes not fully converged (VerbAgg:
# 3.3e-3 lower than the nAGQ = 1 deviance function at the same parameters); the default fit's
# figures are kept under "default" for information.
suppressPackageStartupMessages({ library(lme4); library(jsonlite) })
ds <- file.path("..", "..", "jaxmixed", "data", "datasets")
rd <- function(name, factors) {
  d <- read.csv(file.path(ds, paste0(name, ".csv")), stringsAsFactors = FALSE)
  for (f in factors) d[[f]] <- factor(d[[f]])
  if ("urban" %in% names(d)) d$urbanY <- as.numeric(d$urban == "Y")
  d
}
cases <- list(
  cbpp = list(data = rd("cbpp", c("herd", "period")),
              formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)"),
  verbagg = list(data = rd("verbagg", c("id", "item", "Gender", "btype", "situ", "r2")),
                 formula = "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)"),
  contraception_ri = list(data = rd("contraception", c("district", "use", "livch", "urban")),
                          formula = "use ~ age + I(age^2) + urban + livch + (1 | district)"),
  contraception_slope = list(data = rd("contraception", c("district", "use", "livch", "urban")),
                             formula = "use ~ age + I(age^2) + urbanY + livch + (1 + urbanY | district)")
)
out <- list()
for (nm in names(cases)) {
  cs <- cases[[nm]]
  m <- glmer(as.formula(cs$formula), cs$data, family = binomial, nAGQ = 0L,
             control = glmerControl(tolPwrss = 1e-12))
  m_default <- glmer(as.formula(cs$formula), cs$data, family = binomial, nAGQ = 0L)
  vc <- as.data.frame(VarCorr(m))
  out[[nm]] <- list(
    formula = cs$formula, nAGQ = 0L,
    beta = unname(fixef(m)), beta_names = names(fixef(m)),
    se = unname(sqrt(diag(as.matrix(vcov(m))))),
    theta = unname(getME(m, "theta")),
    sdcor = vc$sdcor, sdcor_names = paste(vc$grp, vc$var1, vc$var2),
    logLik = as.numeric(logLik(m)), deviance = deviance(m),
    default = list(logLik = as.numeric(logLik(m_default)), theta = unname(getME(m_default, "theta")),
                   beta = unname(fixef(m_default))),
    lme4 = as.character(packageVersion("lme4")))
}
out$`_provenance` <- list(script = "tests/reference/make_glmm_nagq0.R", R = R.version.string,
                          note = "glmer(..., family = binomial, nAGQ = 0L, control = glmerControl(tolPwrss = 1e-12))")
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "glmm_nagq0.json")
