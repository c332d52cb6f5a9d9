# Reference profile-likelihood intervals of GLMMs: lme4's confint(m, method = "profile") on the
# data sets shipped with jaxmixed. Run: cd tests/reference && Rscript make_glmm_profile.R
# Writes glmm_profile.json. lme4 1.1-31 (Debian's r-cran-lme4), R 4.2.2. lme4 profiles the
# Laplace deviance (nAGQ = 1) over (θ, β) and interpolates ζ with splines, so its limits carry
# ~1e-4 of interpolation error; the fits are refitted with tight PIRLS and optimiser tolerances.
suppressPackageStartupMessages({ library(lme4); library(jsonlite) })
ds <- file.path("..", "..", "jaxmixed", "data", "datasets")
rd <- function(name, factors) {
  d <- read.csv(file.path(ds, paste0(name, ".csv")), stringsAsFactors = FALSE)
  for (f in factors) d[[f]] <- factor(d[[f]])
  d
}
ctrl <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-12,
                     optCtrl = list(rhoend = 1e-10, maxfun = 1e5))
cases <- list(
  cbpp = list(data = rd("cbpp", c("herd", "period")),
              formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)"),
  contraception_ri_linear_age = list(data = rd("contraception", c("district", "use", "livch", "urban")),
                                     formula = "use ~ urban + age + livch + (1 | district)")
)
out <- list()
for (nm in names(cases)) {
  cs <- cases[[nm]]
  m <- glmer(as.formula(cs$formula), cs$data, family = binomial, control = ctrl)
  ci <- confint(m, method = "profile", level = 0.95)
  out[[nm]] <- list(formula = cs$formula, parameters = rownames(ci),
                    lower = unname(ci[, 1]), upper = unname(ci[, 2]),
                    logLik = as.numeric(logLik(m)), beta = unname(fixef(m)),
                    theta = unname(getME(m, "theta")))
}
out$`_provenance` <- list(script = "tests/reference/make_glmm_profile.R", R = R.version.string,
                          lme4 = as.character(packageVersion("lme4")),
                          note = "confint(glmer(...), method = 'profile'), 95 %")
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "glmm_profile.json")
